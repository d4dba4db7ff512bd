"""FlexLoRA: the exact aggregate ΔW* = Σ_u w_u s_u B_u A_u, truncated by SVD; client u gets its top r_u components.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources",
NeurIPS 2024, https://arxiv.org/abs/2402.11505. The server forms ΔW* and, for each client, its truncated SVD at
the client's rank, split as B = U_r Σ_r, A = V_rᵀ. Here the server keeps the top r_max components (r_max: the
largest client rank, or the run's) and client u takes the first r_u of them, which is the same thing: an SVD's
components are nested, so they are ΔW*'s best rank r_u.

All in factor space, never a d×k matrix: with the stacked A (R×k, R = Σ r_u) and its Gram G_A = S_Aᵀ S_A
(linalg.sqrt_factor), Q_y = Aᵀ S_A⁺ is an orthonormal basis of the clients' A rows and A = S_Aᵀ Q_yᵀ, so
ΔW* = (B·D·S_Aᵀ) Q_yᵀ and ΔW*ᵀΔW* = Q_y C Q_yᵀ with C = S_A G_X S_Aᵀ (R×R, G_X the Gram of B·D). With C = W Σ² Wᵀ,
V = Q_y W: Â = W_rᵀ S_A⁺ᵀ A (orthonormal rows) and s·B̂ = ΔW* V_r = B·D·S_Aᵀ W_r = U_r Σ_r, which never divides by
a singular value. Cost O((d+k)R²) for the Grams plus O(R³); svd.py is the same optimum in a balanced split.

What the paper leaves open, and what we chose:
- Scalings: ΔW* carries each client's s_u (α/r_u or α/√r_u), so clients of different ranks add the updates their
  models really applied; the output scaling s is divided out of B̂ (s·B̂Â = U_r Σ_r V_rᵀ).
- The client weights: the paper weighs by example counts; ours are the run's (uniform, or examples).
- The global model (the paper's server holds the dense ΔW*): the rank-r_max truncation, whose error against ΔW*
  the report gives.
- Singular values that are zero (ΔW* of rank below r_max): their V rows are an orthonormal completion inside
  the span of the clients' A rows (a thin SVD of the dense product also returns some completion), so a client's
  A keeps orthonormal rows and every slot can train; B̂'s columns there are zero. Past the dimension of that span
  (r_max > R) the rows are zero.
- Non-LoRA tensors (a classification head) are averaged with the client weights, as in every method.
"""

import torch

from florana.aggregation.base import Estimate, Method, full_wire
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import pad_rank, sqrt_factor


def estimate(clients: ClientFactors, scale: float) -> Estimate:
    r = clients.out_rank
    S, S_pinv = sqrt_factor(clients.gram_A)
    C = S @ clients.gram_X @ S.mT
    # axes outside the span of the clients' A rows (zero rows of S) sort last, behind the genuine zero σ's
    outside = (S == 0).all(dim=-1).to(C.dtype)
    shift = torch.diagonal(C, dim1=-2, dim2=-1).sum(-1) + 1.0
    _, W = torch.linalg.eigh(C - shift[:, None, None] * torch.diag_embed(outside))
    W = W.flip(-1)[:, :, :r]
    coef_B = clients.column_weights[:, None] * (S.mT @ W) / scale
    coef_A = W.mT @ S_pinv.mT
    return Estimate(*pad_rank(coef_B, coef_A, r))


METHOD = Method(name="flexlora", paper="arXiv:2402.11505", estimate=estimate, wire=full_wire, mixed_ranks=True,
                needs_each_client="it takes the SVD of ΔW* = Σ w_u s_u B_u A_u, a sum of each client's product "
                                  "B_u A_u, which it reads from the stacked client factors")
