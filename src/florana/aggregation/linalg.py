"""Factor-space linear algebra: everything about Σ_u w_u s_u B_u A_u without ever forming a d×k matrix.

All functions are pure and batched over a leading module axis M. Small matrices (R×R, R = Σ_u r_u) are
float64; the big factors stay in their own dtype and are only read through Grams and thin matmuls. Every tensor
is made on the device of its inputs, so the same code runs on the CPU and on a GPU.

Devices without float64 (Apple's MPS) compute the small matrices in float32 (`real_dtype`). A float32 Gram of
factors with n rows is off by at most about n·2⁻²⁴ relative to the product of the norms of the rows it pairs
(≈ 2.4e-4 for n = 4096, typically √n·2⁻²⁴ ≈ 4e-6), so a reported squared error is known to within that fraction of
‖ΔW*‖²: relative errors below ≈ √(n·2⁻²⁴) (≈ 1.6e-2 worst case at n = 4096, ≈ 2e-3 typically) are not resolved, and
an exact method may report up to that instead of 0. Ridges of 1e-12 are below float32's resolution there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Grams are accumulated in float64 so that errors of near-exact estimates are not lost to cancellation;
# this many modules are converted at a time to bound the extra memory.
GRAM_CHUNK_ELEMENTS = 1 << 21


def real_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the small matrices on `device`: float64 wherever the device has it (CPU, CUDA), float32 on MPS."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def cross_gram(X: Tensor, Y: Tensor, *, rows: bool, dtype: torch.dtype | None = None) -> Tensor:
    """Cross Gram of two batches (M, n, p), (M, n', p'): XᵀY (p×p') when rows is False, X Yᵀ (n×n') when rows is
    True, in `dtype` (default: real_dtype of X's device, float64 but on MPS), converted a chunk of modules at a time."""
    dtype = dtype or real_dtype(X.device)
    M = X.shape[0]
    per_module = X.shape[1] * X.shape[2] + Y.shape[1] * Y.shape[2]
    step = max(1, GRAM_CHUNK_ELEMENTS // max(per_module, 1))
    shape = (X.shape[1], Y.shape[1]) if rows else (X.shape[2], Y.shape[2])
    out = torch.empty(M, *shape, dtype=dtype, device=X.device)
    for i in range(0, M, step):
        x = X[i : i + step].to(dtype)
        y = x if Y is X else Y[i : i + step].to(dtype)
        out[i : i + step] = x @ y.mT if rows else x.mT @ y
    return out


def gram(X: Tensor, *, rows: bool, dtype: torch.dtype | None = None) -> Tensor:
    """Gram of a batch (M, n, p): XᵀX (p×p) when rows is False, X Xᵀ (n×n) when rows is True (dtype: cross_gram's)."""
    return cross_gram(X, X, rows=rows, dtype=dtype)


def quad_norm_sq(gram_left: Tensor, N: Tensor, gram_right: Tensor) -> Tensor:
    """‖L N R‖_F² from G_L = LᵀL and G_R = R Rᵀ: tr(Nᵀ G_L N G_R), per module (M,)."""
    return ((gram_left @ N) * (N @ gram_right)).sum(dim=(-2, -1))


def sqrt_factor(G: Tensor, rel_tol: float = 1e-13) -> tuple[Tensor, Tensor]:
    """For a PSD Gram G = XᵀX: S with G = SᵀS, and S⁺ such that Q = X·S⁺ is an orthonormal basis of X's columns.

    Cholesky (S = Lᵀ) where G is comfortably positive definite; elsewhere, e.g. identical clients or a zero
    client weight, the eigen-decomposition S = Λ^½Vᵀ with eigenvalues below rel_tol·λ_max counted as zero.
    """
    L, info = torch.linalg.cholesky_ex(G)
    diag = torch.diagonal(L, dim1=-2, dim2=-1)
    ok = (info == 0) & (diag.amin(-1) > 1e-6 * diag.amax(-1))
    S = L.mT.contiguous()
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device).expand_as(G)
    S_pinv = torch.linalg.solve_triangular(torch.where(ok[:, None, None], S, eye), eye, upper=True)
    if not bool(ok.all()):
        bad = ~ok
        lam, V = torch.linalg.eigh(G[bad])
        keep = lam > rel_tol * lam.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(G.dtype).tiny)
        root = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
        inv_root = torch.where(keep, 1.0 / root.where(keep, torch.ones_like(root)), torch.zeros_like(lam))
        S[bad] = root.unsqueeze(-1) * V.mT
        S_pinv[bad] = V * inv_root.unsqueeze(-2)
    return S, S_pinv


def block_coefficients(ranks: tuple[int, ...], coef: Tensor, r_out: int) -> Tensor:
    """(M, R, r_out) matrix whose u-th row block is coef[:, u]·[I_{r_u} 0]: B @ it is Σ_u coef_u B_u
    (smaller ranks zero-padded to r_out). `coef` is (M, U), in the dtype and on the device of the result."""
    M = coef.shape[0]
    out = coef.new_zeros(M, sum(ranks), r_out)
    start = 0
    for u, r in enumerate(ranks):
        idx = torch.arange(r, device=coef.device)
        out[:, start + idx, idx] = coef[:, u : u + 1]
        start += r
    return out


def best_rank(X: Tensor, Y: Tensor, rank: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The best rank-`rank` approximation of X·Y (X (M, d, n), Y (M, n, k)) as factors B (M, d, rank) and
    A (M, rank, k), with X·Y's squared singular values (M, n), decreasing; see best_rank_coefficients. `dtype`: the
    Grams' (cross_gram's default)."""
    coef_B, coef_A, sigma_sq = best_rank_coefficients(gram(X, rows=False, dtype=dtype), gram(Y, rows=True, dtype=dtype),
                                                      rank)
    return X @ coef_B.to(X.dtype), coef_A.to(Y.dtype) @ Y, sigma_sq


def best_rank_coefficients(gram_X: Tensor, gram_Y: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Eckart–Young in factor space, from the Grams XᵀX and YYᵀ (M, n, n) of a product X·Y: coefficients with
    B = X·coef_B (M, n, rank) and A = coef_A·Y (M, rank, n) the best rank-`rank` factors, balanced (column i of B and
    row i of A both have norm √σ_i), and X·Y's squared singular values (M, n), decreasing. X = Q·S, Z = S·Y,
    Z Zᵀ = S G_Y Sᵀ = U Σ² Uᵀ, B = X S⁺ U_r Σ_r^½, A = Σ_r^-½ U_rᵀ S Y: O(n³) beyond the Grams, no d×k matrix.
    Missing ranks (n < rank, or σ = 0) are zero columns and rows."""
    S, S_pinv = sqrt_factor(gram_X)
    sigma_sq, U = torch.linalg.eigh(S @ gram_Y @ S.mT)
    sigma_sq, U = sigma_sq.flip(-1).clamp_min(0), U.flip(-1)
    n = gram_X.shape[-1]
    if n < rank:
        U = torch.cat([U, U.new_zeros(*U.shape[:-1], rank - n)], dim=-1)
        sigma = torch.cat([sigma_sq, sigma_sq.new_zeros(sigma_sq.shape[0], rank - n)], dim=-1).sqrt()
    else:
        U, sigma = U[..., :rank], sigma_sq[:, :rank].sqrt()
    root = sigma.sqrt()
    inv_root = torch.where(root > 0, 1.0 / root.where(root > 0, 1.0), 0.0)
    return (S_pinv @ U) * root[:, None, :], inv_root[:, :, None] * (U.mT @ S), sigma_sq


def padded_blocks(gram: Tensor, ranks: tuple[int, ...]) -> Tensor:
    """(M, R, R) Gram of clients' factors concatenated along the rank axis (R = Σ_u r_u) → (M, U, r, U, r) with
    r = max r_u: block [u, :, u', :] is client u's factor against client u''s, each zero-padded to rank r (HetLoRA's
    padding: a client of rank r_u has zero components r_u..r). A view when the ranks are equal."""
    M, U, r = gram.shape[0], len(ranks), max(ranks)
    if len(set(ranks)) == 1:
        return gram.view(M, U, r, U, r)
    idx = torch.cat([u * r + torch.arange(ru, device=gram.device) for u, ru in enumerate(ranks)])
    out = gram.new_zeros(M, U * r, U * r)
    out[:, idx[:, None], idx[None, :]] = gram
    return out.view(M, U, r, U, r)


def pad_rank(coef_B: Tensor, coef_A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Coefficients (M, R, r'), (M, r', R) zero-padded to `rank` ≥ r' output components (unchanged when r' ≥ rank)."""
    extra = rank - coef_B.shape[-1]
    if extra <= 0:
        return coef_B, coef_A
    return F.pad(coef_B, (0, extra)), F.pad(coef_A, (0, 0, 0, extra))


def factor_norms(coef_B: Tensor, coef_A: Tensor, gram_B: Tensor, gram_A: Tensor) -> tuple[Tensor, Tensor]:
    """‖B·coef_B‖_F and ‖coef_A·A‖_F per module (M,), from the Grams BᵀB and A Aᵀ (R×R): no d×r or r×k matrix."""
    norm_B = torch.einsum("mij,mik,mkj->m", coef_B, gram_B, coef_B).clamp_min(0).sqrt()
    norm_A = torch.einsum("mij,mjk,mik->m", coef_A, gram_A, coef_A).clamp_min(0).sqrt()
    return norm_B, norm_A


def rescaling(split: str, norm_B: Tensor, norm_A: Tensor, target_A: Tensor | None = None) -> Tensor:
    """The gauge c (M,) for (B̂/c, c·Â), which keeps B̂Â: "balanced" makes ‖B̂‖_F = ‖Â‖_F (both √(‖B̂‖‖Â‖)),
    "client_norm" makes ‖Â‖_F = target_A (the clients' mean ‖A_u‖_F). 1 where a norm vanishes (nothing to split)."""
    ok = (norm_A > 0) & (norm_B > 0)
    safe_A = norm_A.where(ok, 1.0)
    if split == "balanced":
        c = (norm_B.where(ok, 1.0) / safe_A).sqrt()
    elif split == "client_norm":
        ok = ok & (target_A > 0)
        c = target_A / safe_A
    else:
        raise ValueError(f"unknown split {split!r}")
    return torch.where(ok, c, 1.0)
