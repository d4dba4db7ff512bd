"""FFA-LoRA: A stays frozen at the shared random init; only B is trained and averaged, which makes it exact.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
https://arxiv.org/abs/2403.12313. Only B crosses the wire; clients must hold the same A (checked).
"""

import torch

from florana.aggregation.base import Estimate, Method, Wire, weighted_mean_coefficients
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import block_coefficients


def estimate(clients: ClientFactors, scale: float) -> Estimate:
    """B̂ = Σ w_u s_u B_u / scale; Â is the shared A itself (client 0's copy, bit for bit, not a rounded mean)."""
    r = clients.uniform_rank
    coef_B, _ = weighted_mean_coefficients(clients, scale, r)
    first = torch.zeros(clients.B.shape[0], clients.num_clients, dtype=torch.float64)
    first[:, 0] = 1.0
    return Estimate(coef_B, block_coefficients(clients.ranks, first, r).mT)


def wire(r: int, r_out: int, d: int, k: int) -> Wire:
    return Wire(up=r * d, down=r_out * d)


METHOD = Method(name="ffa", paper="arXiv:2403.12313", estimate=estimate, wire=wire, exact=True, trains_A=False)
