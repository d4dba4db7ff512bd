"""FLoRA-NA: Â = Σ_u P_u A_u, B̂ = Σ_u Q_u B_u with server-side weights P, Q chosen so that s·B̂Â is as
close as possible to ΔW* = Σ_u w_u s_u B_u A_u, at FedIT's communication cost (P and Q never leave the server).

Federated Low-Rank Aggregation with Nearly Accurate estimation, https://arxiv.org/abs/2509.26399
(OpenReview 7n5eoDZdZ5), Eq. 6: min_{P,Q} ‖s·(Σ Q_u B_u)(Σ P_v A_v) − ΔW*‖_F².

The paper leaves the solver open; ours, per module and per round:
- With b_u = s_u B_u and K[u,u',v,v'] = ⟨b_u A_v, b_u' A_v'⟩_F (from r×r Gram blocks, no d×k matrix), the loss is
  L = Σ c_uv c_u'v' K[u,u',v,v'] with c_uv = Q_u P_v − w_u δ_uv.
- Start at P = Q = w (exactly FedIT), so the answer is never worse than FedIT.
- Alternating least squares: for fixed P, L is quadratic in Q (a U×U system H_Q(P) Q = J P), and vice versa;
  a step is kept only where it lowers L (a ridge of 1e-12·tr(H)/U guards singular systems).
- Gauge (cQ, P/c) fixed by Σ_u P_u = 1: Â stays an affine combination of the clients' A's.
- Stop when no module improves by more than tol·‖ΔW*‖², or after max_iter sweeps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from florana.aggregation.base import Estimate, Method, full_wire
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import block_coefficients

MAX_ITER = 200
TOL = 1e-10
RIDGE = 1e-12


def pair_inner_products(gram_b: Tensor, gram_a: Tensor, num_clients: int) -> Tensor:
    """K[m,u,u',v,v'] = Σ_ij G_b[u,u']_ij G_A[v,v']_ij from (M, U·r, U·r) Grams of b (= s·B) and A."""
    M, R, _ = gram_b.shape
    U, r = num_clients, R // num_clients
    gb = gram_b.view(M, U, r, U, r).permute(0, 1, 3, 2, 4).reshape(M, U * U, r * r)
    ga = gram_a.view(M, U, r, U, r).permute(0, 1, 3, 2, 4).reshape(M, U * U, r * r)
    return (gb @ ga.mT).view(M, U, U, U, U)


def loss(K: Tensor, J: Tensor, TT: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    """L(P, Q) per module."""
    quad = torch.einsum("mabcd,ma,mb,mc,md->m", K, Q, Q, P, P)
    return quad - 2 * torch.einsum("mac,ma,mc->m", J, Q, P) + TT


def gradients(K: Tensor, J: Tensor, P: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """(∂L/∂P, ∂L/∂Q): zero at a stationary point."""
    grad_Q = 2 * (torch.einsum("mabcd,mc,md,mb->ma", K, P, P, Q) - torch.einsum("mac,mc->ma", J, P))
    grad_P = 2 * (torch.einsum("mabcd,ma,mb,md->mc", K, Q, Q, P) - torch.einsum("mac,ma->mc", J, Q))
    return grad_P, grad_Q


def _solve(H: Tensor, g: Tensor) -> Tensor:
    U = H.shape[-1]
    ridge = RIDGE * torch.diagonal(H, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300) / U
    H = H + ridge[:, None, None] * torch.eye(U, dtype=H.dtype)
    return torch.linalg.solve(H, g.unsqueeze(-1)).squeeze(-1)


def solve_weights(K: Tensor, w: Tensor, max_iter: int = MAX_ITER, tol: float = TOL):
    """ALS for Eq. 6 from FedIT's start. Returns P, Q (M, U), the losses at start and end, and the sweeps run."""
    M, U = K.shape[0], K.shape[1]
    J = torch.einsum("mabcb,b->mac", K, w)
    TT = torch.einsum("mabab,a,b->m", K, w, w)
    P = w.expand(M, U).clone()
    Q = P.clone()
    L = loss(K, J, TT, P, Q)
    start = L.clone()
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        before = L
        Q_new = _solve(torch.einsum("mabcd,mc,md->mab", K, P, P), torch.einsum("mac,mc->ma", J, P))
        L_new = loss(K, J, TT, P, Q_new)
        keep = L_new < L
        Q, L = torch.where(keep[:, None], Q_new, Q), torch.where(keep, L_new, L)
        P_new = _solve(torch.einsum("mabcd,ma,mb->mcd", K, Q, Q), torch.einsum("mac,ma->mc", J, Q))
        L_new = loss(K, J, TT, P_new, Q)
        keep = L_new < L
        P, L = torch.where(keep[:, None], P_new, P), torch.where(keep, L_new, L)
        total = P.sum(-1, keepdim=True)
        gauge = torch.where(total.abs() > 1e-12, total, torch.ones_like(total))
        P, Q = P / gauge, Q * gauge
        if bool(((before - L) <= tol * TT.clamp_min(1e-300)).all()):
            break
    return P, Q, start.clamp_min(0), L.clamp_min(0), sweeps


def estimate(clients: ClientFactors, scale: float) -> Estimate:
    r = clients.uniform_rank
    s = torch.repeat_interleave(torch.tensor(clients.scales, dtype=torch.float64), r)
    K = pair_inner_products(clients.gram_B * s[:, None] * s[None, :], clients.gram_A, clients.num_clients)
    P, Q, start, end, sweeps = solve_weights(K, clients.weights.to(torch.float64))
    coef_B = block_coefficients(clients.ranks, Q * torch.tensor(clients.scales, dtype=torch.float64) / scale, r)
    coef_A = block_coefficients(clients.ranks, P, r).mT
    return Estimate(coef_B, coef_A, info={"P": P, "Q": Q, "sweeps": sweeps})


METHOD = Method(name="florana", paper="arXiv:2509.26399", estimate=estimate, wire=full_wire)
