"""FedSA-LoRA: share the A matrices (general knowledge), keep each client's B (client-specific knowledge).

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025,
https://arxiv.org/abs/2410.01463. Only A crosses the wire. The global model used to evaluate the federation
pairs Â with B̄ = Σ w_u s_u B_u (computed at the server of a simulation; a deployment never sends B).
Mixed ranks as fedit: Â zero-padded to the largest rank; client u gets its first r_u rows and keeps its own B.
"""

from florana.aggregation.base import Method, Wire
from florana.aggregation.fedit import estimate


def wire(r: int, r_out: int, d: int, k: int) -> Wire:
    return Wire(up=r * k, down=min(r, r_out) * k)


METHOD = Method(name="fedsa", paper="arXiv:2410.01463", estimate=estimate, wire=wire, mixed_ranks=True,
                personal_B=True, sum_shaped=True)
