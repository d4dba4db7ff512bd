"""Secure aggregation (Flower's SecAgg+): which methods it serves, and that a run under it gives the plain run's
global adapter to within the quantisation bound, while the server only ever holds the clients' sum."""

import pytest
import torch

from factories import make_clients
from florana.aggregation import METHODS, aggregate_adapters
from florana.lora import LoraAdapter, LoraModule
from florana.lora.adapter import padded_to_rank


def mean_client(clients: list[LoraAdapter], weights: list[float], frozen_A: bool) -> LoraAdapter:
    """One client holding the weighted mean of what the clients add to a secure sum: their factors at the global
    rank (padded_to_rank, as a node pads them), each B carried to the global scaling. A frozen, shared A is not
    summed: the server holds it (a client of the largest rank has all of it)."""
    rank = max(c.config["r"] for c in clients)
    ref = next(c for c in clients if c.config["r"] == rank)
    total = sum(weights)
    summed: dict[str, torch.Tensor] = {}
    for c, w in zip(clients, weights):
        name = next(iter(c.modules))
        tensors = padded_to_rank(c.state_dict(), rank, c.scaling(name) / ref.scaling(name))
        for k, t in tensors.items():
            summed[k] = summed.get(k, 0) + (w / total) * t.double()
    modules = {n: LoraModule(A=ref.modules[n].A if frozen_A else summed[n + ".lora_A.weight"].float(), B=summed[n + ".lora_B.weight"].float())
               for n in ref.modules}
    extra = {k: summed[k].float() for k in ref.extra}
    return LoraAdapter(config=ref.config, modules=modules, extra=extra)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_sum_shaped_is_true_exactly_where_the_weighted_mean_is_all_the_server_needs(name):
    """The registry's `sum_shaped` is checked against the maths: a sum-shaped method's global adapter from the
    clients equals its global adapter from one client holding their weighted mean (which is all SecAgg+ shows the
    server); for every other method the two differ."""
    method = METHODS[name]
    shared_A = not method.trains_A or name == "rolora"  # ffa, fedsvd, rolora (round 1 trains B): one frozen A
    ranks = [2, 4, 2] if method.mixed_ranks else None
    clients = make_clients(3, 4, kind="shared" if shared_A else "lora", ranks=ranks, extra=True, seed=1)
    weights = [3.0, 1.0, 2.0]

    def outcome(result):  # the global adapter and any change of the base weights (fedex's residual)
        return {**result.adapter.state_dict(), **{f"base::{k}": v for k, v in result.base_update.items()}}
    direct = outcome(aggregate_adapters(clients, method, weights))
    via_mean = outcome(aggregate_adapters([mean_client(clients, weights, shared_A)], method))
    same = direct.keys() == via_mean.keys() and all(
        direct[k].shape == via_mean[k].shape and torch.allclose(direct[k], via_mean[k], atol=1e-5, rtol=1e-5)
        for k in direct)
    assert same == method.sum_shaped, (name, method.needs_each_client)
    assert bool(method.needs_each_client) != method.sum_shaped
