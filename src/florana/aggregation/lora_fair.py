"""LoRA-FAIR: FedIT's averages Ā, B̄, then a server-side correction ΔB so that (B̄ + ΔB)Ā points along ΔW*;
clients start the next round from Ā and B̄ + ΔB.

Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement", ICCV 2025,
https://arxiv.org/abs/2411.14961 (code github.com/jmbian/LoRA-FAIR; re-implemented in DASS-Lab-Group/SpecTraL,
server.py `_optimize_delta_lora_B`). The server maximises cos((B̄ + ΔB)Ā, ΔW*) − λ‖ΔB‖_F² by gradient steps.
Communication is FedIT's: both factors up and down.

Factor space: with Ā fixed, the gradient of either term with respect to ΔB is a combination of ΔW*Āᵀ = B·D·(AĀᵀ)
and (B̄ + ΔB)ĀĀᵀ and ΔB, so ΔB started at zero stays in the span of the clients' B columns. With the clients' raw
B = Q·S (Q orthonormal d×R, S from their R×R Gram) the iterate is B̄ + ΔB = Q·β, and everything the steps need is
R×r: ⟨(Qβ)Ā, ΔW*⟩ = ⟨β, K⟩ with K = S·D·G_A·αᵀ (Ā = α·A), ‖(Qβ)Ā‖² = ⟨βᵀβ, ĀĀᵀ⟩, ‖ΔB‖² = ‖β − β̄‖². As Q is
orthonormal, a gradient step on β is the same step on ΔB in d×r. `refit = "least_squares"` replaces the steps by
the closed-form optimum for the fixed Ā, B̂ = argmin ‖s·BĀ − ΔW*‖ = ΔW*Āᵀ(ĀĀᵀ)⁻¹/s (s·β·ĀĀᵀ = K).

What the paper leaves open, and our choices (run config keys `lora_fair_*`):
- λ = 0.01 (the paper's; SpecTraL uses 1.0), plain gradient ascent (SGD, no momentum) with learning rate 0.01
  (SpecTraL's) for a fixed number of steps (100; SpecTraL runs up to 1000 and stops when the loss changes by less
  than 1e-6 five times in a row). A fixed count keeps every module's refinement independent of the others.
- ΔB starts at zero (SpecTraL starts it at a random Xavier draw, which would leave the span of the client factors
  and make the result depend on a seed).
- The cosine is that of the whole d×k matrices (the Frobenius inner product), as the paper's objective reads;
  SpecTraL averages the cosines of the columns, which factor space could compute only at O(k·R²) per step.
- Per module and per round; the clients' scalings s_u are folded into ΔW* and B̄ as for FedIT.
- Where B̄Ā or ΔW* is zero (every B still at its zero init) the cosine is undefined and B̄ is kept.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from florana.aggregation.base import Estimate, Method, full_wire, weighted_mean_coefficients
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import sqrt_factor
from florana.errors import FloranaError

LAMBDA, STEPS, LR = 0.01, 100, 0.01
REFITS = ("cosine", "least_squares")


def estimate(clients: ClientFactors, scale: float, lam: float = LAMBDA, steps: int = STEPS, lr: float = LR,
             refit: str = "cosine") -> Estimate:
    if refit not in REFITS:
        raise FloranaError(f"lora_fair refit must be one of {', '.join(REFITS)}, got {refit!r}")
    r = clients.uniform_rank
    coef_B, coef_A = weighted_mean_coefficients(clients, scale, r)  # B̄ = B·coef_B, Ā = coef_A·A
    S, S_pinv = sqrt_factor(clients.gram_B)
    H = coef_A @ clients.gram_A @ coef_A.mT  # ĀĀᵀ (r×r)
    K = S @ (clients.column_weights[:, None] * (clients.gram_A @ coef_A.mT))  # ΔW*Āᵀ = Q·K (R×r)
    start = S @ coef_B  # B̄ = Q·start
    norm_T = clients.target_norm_sq.sqrt()
    cos_start = _cosine(start, H, K, norm_T)
    if refit == "least_squares":
        ridge = 1e-12 * torch.diagonal(H, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300) / r
        beta = torch.linalg.solve(H + ridge[:, None, None] * torch.eye(r, dtype=H.dtype, device=H.device), K.mT / scale).mT
    else:
        beta = start.clone()
        for _ in range(steps):
            BH = beta @ H
            norm_P_sq = (BH * beta).sum((-2, -1))
            inner = (beta * K).sum((-2, -1))
            defined = (norm_P_sq > 0) & (norm_T > 0)
            denom = torch.where(defined, norm_P_sq.sqrt() * norm_T, 1.0)
            ratio = torch.where(defined, inner / norm_P_sq.where(defined, 1.0), 0.0)
            grad = (K - ratio[:, None, None] * BH) / denom[:, None, None] - 2 * lam * (beta - start)
            beta = beta + lr * torch.where(defined[:, None, None], grad, 0.0)
    return Estimate(S_pinv @ beta, coef_A,
                    info={"cosine_fedit": cos_start, "cosine": _cosine(beta, H, K, norm_T)})


def _cosine(beta, H, K, norm_T):
    """cos((Qβ)Ā, ΔW*) per module (0 where undefined)."""
    norm_P = ((beta @ H) * beta).sum((-2, -1)).clamp_min(0).sqrt()
    inner = (beta * K).sum((-2, -1))
    defined = (norm_P > 0) & (norm_T > 0)
    return torch.where(defined, inner / (norm_P * norm_T).where(defined, 1.0), 0.0)


def configure(method: Method, lam: float = LAMBDA, steps: int = STEPS, lr: float = LR,
              refit: str = "cosine") -> Method:
    if refit not in REFITS:
        raise FloranaError(f"lora_fair refit must be one of {', '.join(REFITS)}, got {refit!r}")
    return replace(method, estimate=partial(estimate, lam=lam, steps=steps, lr=lr, refit=refit))


METHOD = Method(name="lora_fair", paper="arXiv:2411.14961", estimate=estimate, wire=full_wire, configure=configure,
                needs_each_client="its refinement of B̄ aims at ΔW* = Σ w_u s_u B_u A_u, a sum of each client's "
                                  "product B_u A_u, read from the stacked client factors")
