"""svd: the best rank-r aggregate (Eckart–Young), computed in factor space; beyond the FLoRA-NA paper.

ΔW* = X·A with X = B·D (d×R). With X = Q·S (Q = X·S⁺ orthonormal, S from X's Gram), ΔW* = Q·Z, Z = S·A,
and Z Zᵀ = S G_A Sᵀ = U Σ² Uᵀ (R×R). The best rank r is Q U_r U_rᵀ Z, split as
B̂ ∝ X S⁺ U_r Σ_r^½ and Â ∝ Σ_r^-½ U_rᵀ S A. Cost O((d+k)R²); no d×k matrix, no d×d SVD.
The split between B̂ and Â (run config key `svd_split`) never changes s·B̂Â: by default ("client_norm") the gauge
(B̂/c, c·Â) is fixed so that ‖Â‖_F equals the clients' mean ‖A_u‖_F, the scale they trained A at; "balanced" gives
‖B̂‖_F = ‖Â‖_F (as stored; as every component i has ‖B̂_i‖ = √σ_i/s and ‖Â_i‖ = √σ_i before the gauge, one c
balances each component too); "b" puts all of Σ in B̂ (s·B̂ = U_rΣ_r, Â = V_rᵀ with orthonormal rows, FlexLoRA's and
FedSVD's split; components with σ = 0 have zero rows).
Mixed ranks are fine: the output has the largest client rank (or the global rank asked for, zero-padded past
Σ r_u). Its components are ordered by singular value, so a client's first r_u are ΔW*'s best rank r_u.
"""

from dataclasses import replace
from functools import partial

import torch

from florana.aggregation.base import Estimate, Method, full_wire
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import factor_norms, pad_rank, rescaling
from florana.errors import FloranaError


SPLITS = ("client_norm", "balanced", "b")


def estimate(clients: ClientFactors, scale: float, split: str = "client_norm") -> Estimate:
    check_split(split)
    r = clients.out_rank
    S, S_pinv = clients.root_X
    sigma_sq, U = clients.spectrum
    sigma = sigma_sq[:, :r].sqrt()
    positive = sigma > 0
    # s·B̂ = Q U_r·diag(root), Â = diag(1/root)·U_rᵀZ, whose rows have norms σ_i: root = √σ balances each component,
    # root = σ leaves Â orthonormal rows
    root = sigma if split == "b" else sigma.sqrt()
    inv_root = torch.where(positive, 1.0 / root.where(positive, 1.0), 0.0)
    U_r = U[:, :, :r]
    coef_B = clients.column_weights[:, None] * (S_pinv @ U_r) * root[:, None, :] / scale
    coef_A = inv_root[:, :, None] * (U_r.mT @ S)
    if split != "b":
        norm_B, norm_A = factor_norms(coef_B, coef_A, clients.gram_B, clients.gram_A)
        c = rescaling(split, norm_B, norm_A, clients.mean_A_norm())
        coef_B, coef_A = coef_B / c[:, None, None], coef_A * c[:, None, None]
    return Estimate(*pad_rank(coef_B, coef_A, r))


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise FloranaError(f"svd split must be one of {', '.join(SPLITS)}, got {split!r}")


def configure(method: Method, split: str = "client_norm") -> Method:
    check_split(split)
    return replace(method, estimate=partial(estimate, split=split))


METHOD = Method(name="svd", paper="Eckart–Young optimum at rank r", estimate=estimate, wire=full_wire,
                mixed_ranks=True, configure=configure,
                needs_each_client="the best rank-r aggregate is an SVD of the stacked factors [B_1 … B_U], "
                                  "[A_1; …; A_U], which needs each client's factors")
