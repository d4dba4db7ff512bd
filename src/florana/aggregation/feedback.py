"""Error feedback: the server keeps what aggregation lost and adds it to the next round's target. Beyond the papers
(none of the published methods keeps it); `error_feedback = true` in a run, for any inexact method of the Estimate
form (fedit, florana, svd, lora_fair, and any such method added later).

Round t, per module: ΔW*_t from the clients, the method's answer s·B̂Â, and the residual R_{t−1}, kept as factors
R = B_R·A_R (rank ≤ r, the scaling folded into B_R; none before the first aggregation).
- Applied: s·B̃Ã = the best rank-r approximation of s·B̂Â + R_{t−1}, by Eckart–Young on the 2r-wide stack
  [s·B̂, B_R]·[Â; A_R], rescaled so that ‖Ã‖_F = ‖Â‖_F (A stays at the scale the method gives it). Without a
  residual the method's answer is kept bit for bit.
- Kept: R_t = ΔW*_t + R_{t−1} − s·B̃Ã on the stack [B·D, B_R, −s·B̃]·[A; A_R; Ã] (Σr_u + 2r wide), truncated to rank r
  from the stack's Grams (the clients' blocks are the report's own): r(d+k) values per module, like one client's
  adapter; never a d×k matrix, nor a copy of the clients' factors. B̃, Ã are the factors as output
  (rounded to the clients' dtype), so the accounting holds for what the clients really get.
Round over round, Σ_t s·B̃_tÃ_t = Σ_t ΔW*_t − R_T − Σ_t E_t, where E_t is what the rank-r truncation of R_t dropped
(`feedback_dropped` in the report). Nothing extra crosses the wire: clients receive B̃, Ã in place of B̂, Â.

Why "the method's answer plus R" rather than "the method on the target ΔW* + R": a method of the Estimate form answers
from its clients' factors (FedIT averages them and has no target to hand R to), so one rule serves every method, and
the method's own answer is what a round without residual applies. (For svd alone, Eckart–Young of ΔW* + R in one
truncation would be the other natural choice.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import best_rank, best_rank_coefficients, cross_gram, gram


def feed_back(clients: ClientFactors, B_hat: Tensor, A_hat: Tensor, scale: float, residual: tuple[Tensor, Tensor] | None,
              rank: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor], Tensor, Tensor]:
    """(B̃, Ã) in B̂'s dtype, the new residual's factors (B_R, A_R), ‖R_t‖² as kept and what the truncation dropped,
    per module (M,). B_hat (M, d, r), A_hat (M, r, k) are the method's factors as output; residual the previous
    (B_R, A_R) of these modules, or None."""
    work, dtype = clients.B.dtype, B_hat.dtype
    if residual is not None:
        B_R, A_R = (t.to(work) for t in residual)
        B_t, A_t, _ = best_rank(torch.cat([scale * B_hat.to(work), B_R], dim=-1),
                                torch.cat([A_hat.to(work), A_R], dim=-2), rank, dtype=clients.real)
        norm_hat = A_hat.to(clients.real).pow(2).sum((-2, -1)).sqrt()
        norm_t = A_t.to(clients.real).pow(2).sum((-2, -1)).sqrt()
        gauge = torch.where(norm_t > 0, norm_hat / norm_t.where(norm_t > 0, 1.0), 1.0)[:, None, None]
        B_hat = (B_t.to(clients.real) / (scale * gauge)).to(dtype)
        A_hat = (A_t.to(clients.real) * gauge).to(dtype)
    # R_t's factors: the clients' stack [B·D | E] [A; F], with E = [B_R, −s·B̃] and F = [A_R; Ã] a few columns and
    # rows; the clients' Grams are the ones every report computes, so only E's and F's are new
    E = torch.cat(([B_R] if residual is not None else []) + [-scale * B_hat.to(work)], dim=-1)
    F = torch.cat(([A_R] if residual is not None else []) + [A_hat.to(work)], dim=-2)
    D = clients.column_weights
    real = clients.real
    cross_X = D[:, None] * cross_gram(clients.B, E, rows=False, dtype=real)
    gram_X = torch.cat([torch.cat([clients.gram_X, cross_X], dim=-1),
                        torch.cat([cross_X.mT, gram(E, rows=False, dtype=real)], dim=-1)], dim=-2)
    cross_Y = cross_gram(clients.A, F, rows=True, dtype=real)
    gram_Y = torch.cat([torch.cat([clients.gram_A, cross_Y], dim=-1),
                        torch.cat([cross_Y.mT, gram(F, rows=True, dtype=real)], dim=-1)], dim=-2)
    coef_B, coef_A, sigma_sq = best_rank_coefficients(gram_X, gram_Y, rank)
    R = clients.B.shape[-1]
    B_new = clients.B @ (D[:, None] * coef_B[:, :R]).to(work) + E @ coef_B[:, R:].to(work)
    A_new = coef_A[:, :, :R].to(work) @ clients.A + coef_A[:, :, R:].to(work) @ F
    keep = torch.float64 if work == torch.float64 else torch.float32
    return B_hat, A_hat, (B_new.to(keep), A_new.to(keep)), sigma_sq[:, :rank].sum(-1), sigma_sq[:, rank:].sum(-1)
