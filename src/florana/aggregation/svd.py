"""svd: the best rank-r aggregate (Eckart–Young), computed in factor space; beyond the FLoRA-NA paper.

ΔW* = X·Y with X = B·D (d×R) and Y = A (R×k). With Gram square roots X = Q_X S_X and Y = S_Yᵀ Q_Yᵀ,
ΔW* = Q_X (S_X S_Yᵀ) Q_Yᵀ, so the SVD of the R×R core gives ΔW*'s top singular triplets:
B̂ ∝ Q_X U_r Σ_r^½, Â ∝ Σ_r^½ V_rᵀ Q_Yᵀ. Cost O((d+k)R²); no d×k matrix, no d×d SVD.
The gauge (B̂/c, c·Â) is fixed so that ‖Â‖_F equals the clients' mean ‖A_u‖_F, the scale they trained A at.
Mixed ranks are fine: the output has the largest client rank.
"""

import torch

from florana.aggregation.base import Estimate, Method, full_wire
from florana.aggregation.factors import ClientFactors


def estimate(clients: ClientFactors, scale: float) -> Estimate:
    r = max(clients.ranks)
    (_, x_pinv_t), (_, a_pinv_t) = clients.roots
    U, sigma, Vh = clients.core_svd
    root = sigma[:, :r].sqrt()
    coef_B = clients.column_weights[:, None] * (x_pinv_t @ U[:, :, :r]) * root[:, None, :] / scale
    coef_A = root[:, :, None] * (Vh[:, :r, :] @ a_pinv_t.mT)
    norm_A = torch.einsum("mij,mjk,mik->m", coef_A, clients.gram_A, coef_A).clamp_min(0).sqrt()
    gauge = torch.where(norm_A > 0, clients.mean_A_norm() / norm_A.where(norm_A > 0, 1.0), 1.0)
    return Estimate(coef_B / gauge[:, None, None], coef_A * gauge[:, None, None])


METHOD = Method(name="svd", paper="Eckart–Young optimum at rank r", estimate=estimate, wire=full_wire,
                mixed_ranks=True)
