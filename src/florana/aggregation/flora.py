"""FLoRA: stack the clients' factors, B_s = [w_1 s_1 B_1 … w_U s_U B_U], A_s = [A_1; …; A_U] (rank Σ r_u).

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
NeurIPS 2024, https://arxiv.org/abs/2409.05976. Exact and rank-heterogeneous; every client downloads
all clients' factors, merges scale·B_s A_s into its base weights and starts a fresh LoRA each round.
"""

import torch

from florana.aggregation.base import Estimate, Method, Wire
from florana.aggregation.factors import ClientFactors


def estimate(clients: ClientFactors, scale: float) -> Estimate:
    M, R = clients.B.shape[0], clients.B.shape[2]
    coef_B = torch.diag(clients.column_weights / scale).expand(M, R, R)
    coef_A = torch.eye(R, dtype=clients.real, device=clients.device).expand(M, R, R)
    return Estimate(coef_B, coef_A)


def wire(r: int, r_out: int, d: int, k: int) -> Wire:
    return Wire(up=r * (d + k), down=r_out * (d + k))


METHOD = Method(name="flora", paper="arXiv:2409.05976", estimate=estimate, wire=wire, out_rank=sum,
                mixed_ranks=True, exact=True, merges=True,
                needs_each_client="it stacks every client's B_u and A_u (rank Σ r_u) into the base change every "
                                  "client merges: the server sends each client's factors on")
