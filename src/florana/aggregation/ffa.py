"""FFA-LoRA: A stays frozen at the shared random init; only B is trained and averaged, which makes it exact.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
https://arxiv.org/abs/2403.12313. Only B crosses the wire; clients must hold the same A (checked).
Mixed ranks: a client of rank r_u holds the first r_u rows of the shared A (checked), so zero-padding B to the
largest rank keeps it exact: Σ w_u s_u B_u A[:r_u] = (Σ w_u s_u [B_u 0]) A. Client u gets the first r_u columns.
"""

import torch

from florana.aggregation.base import Estimate, Method, Wire, weighted_mean_coefficients
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import block_coefficients


def estimate(clients: ClientFactors, scale: float) -> Estimate:
    """B̂ = Σ w_u s_u B_u / scale; Â is the shared A itself (the copy of the first client of the largest rank, bit
    for bit, not a rounded mean)."""
    r = clients.out_rank
    coef_B, _ = weighted_mean_coefficients(clients, scale, r)
    first = torch.zeros(clients.B.shape[0], clients.num_clients, dtype=clients.real, device=clients.device)
    first[:, clients.ranks.index(max(clients.ranks))] = 1.0
    return Estimate(coef_B, block_coefficients(clients.ranks, first, r).mT)


def wire(r: int, r_out: int, d: int, k: int) -> Wire:
    return Wire(up=r * d, down=min(r, r_out) * d)


METHOD = Method(name="ffa", paper="arXiv:2403.12313", estimate=estimate, wire=wire, mixed_ranks=True, exact=True,
                trains_A=False, sum_shaped=True)
