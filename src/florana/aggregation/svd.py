"""svd: the best rank-r aggregate (Eckart–Young), computed in factor space; beyond the FLoRA-NA paper.

ΔW* = X·A with X = B·D (d×R). With X = Q·S (Q = X·S⁺ orthonormal, S from X's Gram), ΔW* = Q·Z, Z = S·A,
and Z Zᵀ = S G_A Sᵀ = U Σ² Uᵀ (R×R). The best rank r is Q U_r U_rᵀ Z, split as
B̂ ∝ X S⁺ U_r Σ_r^½ and Â ∝ Σ_r^-½ U_rᵀ S A. Cost O((d+k)R²); no d×k matrix, no d×d SVD.
The gauge (B̂/c, c·Â) is fixed so that ‖Â‖_F equals the clients' mean ‖A_u‖_F, the scale they trained A at.
Mixed ranks are fine: the output has the largest client rank (or the global rank asked for, zero-padded past
Σ r_u). Its components are ordered by singular value, so a client's first r_u are ΔW*'s best rank r_u.
"""

import torch

from florana.aggregation.base import Estimate, Method, full_wire
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import pad_rank


def estimate(clients: ClientFactors, scale: float) -> Estimate:
    r = clients.out_rank
    S, S_pinv = clients.root_X
    sigma_sq, U = clients.spectrum
    sigma = sigma_sq[:, :r].sqrt()
    positive = sigma > 0
    root = sigma.sqrt()
    inv_root = torch.where(positive, 1.0 / root.where(positive, 1.0), 0.0)
    U_r = U[:, :, :r]
    coef_B = clients.column_weights[:, None] * (S_pinv @ U_r) * root[:, None, :] / scale
    coef_A = inv_root[:, :, None] * (U_r.mT @ S)
    norm_A = torch.einsum("mij,mjk,mik->m", coef_A, clients.gram_A, coef_A).clamp_min(0).sqrt()
    gauge = torch.where(norm_A > 0, clients.mean_A_norm() / norm_A.where(norm_A > 0, 1.0), 1.0)
    return Estimate(*pad_rank(coef_B / gauge[:, None, None], coef_A * gauge[:, None, None], r))


METHOD = Method(name="svd", paper="Eckart–Young optimum at rank r", estimate=estimate, wire=full_wire,
                mixed_ranks=True)
