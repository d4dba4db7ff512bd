"""Federated LoRA fine-tuning with FLoRA-NA and a dozen other federated-LoRA aggregators.

The stable Python API is what `__all__` lists; it is imported on first use, so `import florana` stays light.
Everything else (florana.aggregation, florana.lora, ...) is internal and may change.
"""

from importlib import import_module

__all__ = ["METHODS", "AggregateReport", "FloranaError", "aggregate", "client_helpers"]

_WHERE = {"aggregate": "florana.api", "AggregateReport": "florana.api", "FloranaError": "florana.errors",
          "METHODS": "florana.aggregation.registry"}


def __getattr__(name: str):
    if name == "client_helpers":
        return import_module("florana.client_helpers")
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'florana' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
