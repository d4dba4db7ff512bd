"""Federated-LoRA aggregators as pure functions on tensors, one file per method, and their registry.

Imports nothing from training, Flower or the CLI.
"""

from florana.aggregation.adapters import Aggregation, Report, aggregate_adapters, check_clients
from florana.aggregation.base import Estimate, Method, Wire, client_weights
from florana.aggregation.factors import ClientFactors
from florana.aggregation.registry import METHODS, get_method

__all__ = ["Aggregation", "Report", "aggregate_adapters", "check_clients", "Estimate", "Method", "Wire",
           "client_weights", "ClientFactors", "METHODS", "get_method"]
