"""FedIT: average A and B separately.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024,
https://arxiv.org/abs/2305.05644. Inexact: mean(B)·mean(A) ≠ mean(B·A).
Clients of different ranks are zero-padded to the largest rank (HetLoRA's padding, arXiv 2401.06432): component
j of the global factors averages the clients that have it, the others counting as zero, so the components only
large clients hold shrink by their weight share. Client u gets back the first r_u components.
"""

from florana.aggregation.base import Estimate, Method, full_wire, weighted_mean_coefficients
from florana.aggregation.factors import ClientFactors


def estimate(clients: ClientFactors, scale: float) -> Estimate:
    """B̂ = Σ w_u s_u B_u / scale, Â = Σ w_u A_u, zero-padded to the global rank."""
    return Estimate(*weighted_mean_coefficients(clients, scale, clients.out_rank))


METHOD = Method(name="fedit", paper="arXiv:2305.05644", estimate=estimate, wire=full_wire, mixed_ranks=True,
                sum_shaped=True)
