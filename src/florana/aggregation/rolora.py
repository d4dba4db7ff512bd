"""RoLoRA: rounds alternate the factor that trains; the other is frozen and shared, so averaging is exact.

Chen, Guo, Ju, Dalal, Zhu, Khisti, "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA",
NeurIPS 2025, https://arxiv.org/abs/2502.01755 (no public code). In a round where B trains, every client holds the
same frozen A, so Σ_u w_u s_u B_u A = (Σ_u w_u s_u B_u) A: the server averages B and ΔW* is met exactly; in a round
where A trains, the same with the roles swapped. Each round one factor goes up (the trained one) and one comes down
(the one frozen in the round, i.e. the factor the server averaged the round before).

What the paper leaves open, and our choices:
- Which factor trains first: B, in odd rounds (A in even ones). LoRA starts at B = 0, where A's gradient
  s·Bᵀ∂L/∂(ΔW) is zero: an A-first round would train nothing but the head.
- Round 1 sends the frozen A (its shared initial value) down, as every method sends its global factors in round 1.
- Partial participation: a client that missed the round before also lacks the factor it is about to train; the
  server sends it every factor that changed since it last downloaded (the engine's catch-up, booked as it moves).
- The frozen factor of the global adapter is client 0's copy, bit for bit (every copy is the same), as ffa does;
  the trained one is the weighted mean with the clients' scalings folded in.
- The optimizer restarts each round (as for every method here), over the factor that trains and the head.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from florana.aggregation import ffa
from florana.aggregation.base import Estimate, Method, factor_wire, full_wire
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import block_coefficients


def estimate_B_frozen(clients: ClientFactors, scale: float) -> Estimate:
    """Â = Σ w_u s_u A_u / scale, B̂ = the shared B itself (client 0's copy)."""
    r, M = clients.uniform_rank, clients.B.shape[0]
    ws = clients.weights.to(clients.real) * clients.scale_vector
    first = torch.zeros(M, clients.num_clients, dtype=clients.real, device=clients.device)
    first[:, 0] = 1.0
    coef_A = block_coefficients(clients.ranks, (ws / scale).expand(M, -1), r).mT
    return Estimate(block_coefficients(clients.ranks, first, r), coef_A)


def trained_in(round_: int) -> str:
    """The factor clients train in round `round_`: B in odd rounds, A in even ones."""
    return "B" if round_ % 2 == 1 else "A"


def by_round(method: Method, round_: int) -> Method:
    trains = trained_in(round_)
    frozen = "A" if trains == "B" else "B"
    return replace(method, trains_A=trains == "A", trains_B=trains == "B", down=frozenset(frozen),
                   estimate=ffa.estimate if trains == "B" else estimate_B_frozen,
                   wire=factor_wire(trains, trains), by_round=None)


METHOD = Method(name="rolora", paper="arXiv:2502.01755", estimate=ffa.estimate, wire=full_wire, exact=True,
                by_round=by_round, sum_shaped=True)
