"""FedEx-LoRA: FedIT's factors plus the dense residual ΔW* − s·B̂Â added to every client's frozen base weight.

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation
Models", ACL 2025, https://arxiv.org/abs/2410.09432. Exact, at the price of the residual's download per module:
it has rank at most Σr_u + r_out, so it travels as factors when that is smaller than the dense d×k (at LLaMA-2-7B
shapes, r=16 and 10 clients: 176·8192 values instead of 4096², 8.6% of it) and as d×k otherwise
(adapters.residual_change decides, and the ledger books what it sent).
Clients of different ranks are zero-padded to the largest rank; the residual makes that exact too. The global
model (base + residual + s·B̂Â) is exact; a client of rank r_u < r_max starts from it less the components
r_u..r_max it cannot hold (it gets the first r_u, as in fedit).
"""

from florana.aggregation.base import Estimate, Method, Wire, weighted_mean_coefficients
from florana.aggregation.factors import ClientFactors


def estimate(clients: ClientFactors, scale: float) -> Estimate:
    return Estimate(*weighted_mean_coefficients(clients, scale, clients.out_rank))


def wire(r: int, r_out: int, d: int, k: int) -> Wire:
    """The factors; the residual is booked in the form it is sent (factors or dense), which depends on every
    client's rank."""
    return Wire(up=r * (d + k), down=min(r, r_out) * (d + k))


METHOD = Method(name="fedex", paper="arXiv:2410.09432", estimate=estimate, wire=wire, mixed_ranks=True,
                exact=True, residual=True,
                needs_each_client="its dense residual ΔW* − s·B̂Â needs ΔW* = Σ w_u s_u B_u A_u, a sum of each "
                                  "client's product B_u A_u, which the sum of the factors does not give")
