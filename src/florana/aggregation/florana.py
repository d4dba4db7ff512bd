"""FLoRA-NA: Â = Σ_u P_u A_u, B̂ = Σ_u Q_u B_u with server-side weights P, Q chosen so that s·B̂Â is as
close as possible to ΔW* = Σ_u w_u s_u B_u A_u, at FedIT's communication cost (P and Q never leave the server).

Federated Low-Rank Aggregation with Nearly Accurate estimation, https://arxiv.org/abs/2509.26399
(OpenReview 7n5eoDZdZ5), Eq. 6: min_{P,Q} ‖s·(Σ Q_u B_u)(Σ P_v A_v) − ΔW*‖_F².

The paper leaves the solver open; ours, per module and per round:
- With b_u = s_u B_u, the r×r Gram blocks G_b[u,u'] = b_uᵀb_u' and G_A[v,v'] = A_v A_v'ᵀ give everything:
  ‖B̂Â‖² = ⟨G_B̂, G_Â⟩ with G_B̂ = Σ Q_u Q_u' G_b[u,u'] and G_Â = Σ P_v P_v' G_A[v,v'], and
  J[u,v] = ⟨b_u A_v, ΔW*⟩ = Σ_u' w_u' ⟨G_b[u,u'], G_A[v,u']⟩. No d×k matrix, and no U⁴ tensor either:
  an ALS sweep costs O(U²r²), J once O(U³r²), so a hundred clients are cheap.
- L(P,Q) = ⟨G_B̂, G_Â⟩ − 2 QᵀJP + ‖ΔW*‖².
- Start at P = Q = w (exactly FedIT), so the answer is never worse than FedIT.
- Alternating least squares: for fixed P, L is quadratic in Q (a U×U system H_Q Q = J P with
  H_Q[u,u'] = ⟨G_b[u,u'], G_Â⟩), and vice versa; a step is kept only where it lowers L (a ridge of
  1e-12·tr(H)/U guards singular systems).
- Gauge (cQ, P/c) fixed by Σ_u P_u = 1: Â stays an affine combination of the clients' A's.
- Stop when no module improves by more than tol·‖ΔW*‖², or after max_iter sweeps.
- Mixed ranks: every client's factors are zero-padded to the largest rank (HetLoRA's padding), i.e. its Gram
  blocks are; the fit above runs unchanged on the padded blocks, and its start P = Q = w is padded FedIT.
"""

from __future__ import annotations

import torch
from torch import Tensor

from florana.aggregation.base import Estimate, Method, full_wire
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import block_coefficients, padded_blocks

MAX_ITER = 200
TOL = 1e-10
RIDGE = 1e-12


def blocks(gram: Tensor, num_clients: int) -> Tensor:
    """(M, U·r, U·r) Gram of equal ranks → (M, U, r, U, r): block [u, :, u', :] is client u's factor against
    client u''s (linalg.padded_blocks does it for mixed ranks)."""
    M, R, _ = gram.shape
    return gram.view(M, num_clients, R // num_clients, num_clients, R // num_clients)


def combine(G: Tensor, c: Tensor) -> Tensor:
    """Σ_uu' c_u c_u' G[u, :, u', :]: the r×r Gram of Σ_u c_u (factor u)."""
    return torch.einsum("muiwj,mu,mw->mij", G, c, c)


def against(G: Tensor, other: Tensor) -> Tensor:
    """H[u,u'] = ⟨G[u, :, u', :], other⟩ for an r×r `other` (U×U)."""
    return torch.einsum("muiwj,mij->muw", G, other)


def cross_terms(Gb: Tensor, Ga: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """J[u,v] = ⟨b_u A_v, ΔW*⟩ and ‖ΔW*‖², per module."""
    J = torch.einsum("muiwj,mviwj->muv", Gb * w[None, None, None, :, None], Ga)
    return J, torch.einsum("muu,u->m", J, w)  # ‖ΔW*‖² = Σ_u w_u ⟨b_u A_u, ΔW*⟩


def loss(Gb: Tensor, Ga: Tensor, J: Tensor, TT: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    """L(P, Q) per module."""
    quad = (combine(Gb, Q) * combine(Ga, P)).sum(dim=(-2, -1))
    return quad - 2 * torch.einsum("muv,mu,mv->m", J, Q, P) + TT


def gradients(Gb: Tensor, Ga: Tensor, J: Tensor, P: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """(∂L/∂P, ∂L/∂Q): zero at a stationary point."""
    grad_Q = 2 * (torch.einsum("muw,mw->mu", against(Gb, combine(Ga, P)), Q) - torch.einsum("muv,mv->mu", J, P))
    grad_P = 2 * (torch.einsum("muw,mw->mu", against(Ga, combine(Gb, Q)), P) - torch.einsum("muv,mu->mv", J, Q))
    return grad_P, grad_Q


def _solve(H: Tensor, g: Tensor) -> Tensor:
    U = H.shape[-1]
    ridge = RIDGE * torch.diagonal(H, dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300) / U
    H = H + ridge[:, None, None] * torch.eye(U, dtype=H.dtype, device=H.device)
    return torch.linalg.solve(H, g.unsqueeze(-1)).squeeze(-1)


def solve_weights(Gb: Tensor, Ga: Tensor, w: Tensor, max_iter: int = MAX_ITER, tol: float = TOL):
    """ALS for Eq. 6 from FedIT's start, on block Grams (M, U, r, U, r) of b = s·B and A.
    Returns P, Q (M, U) and the number of sweeps run."""
    M, U = Gb.shape[0], Gb.shape[1]
    J, TT = cross_terms(Gb, Ga, w)
    P = w.expand(M, U).clone()
    Q = P.clone()
    L = loss(Gb, Ga, J, TT, P, Q)
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        before = L
        Q_new = _solve(against(Gb, combine(Ga, P)), torch.einsum("muv,mv->mu", J, P))
        L_new = loss(Gb, Ga, J, TT, P, Q_new)
        keep = L_new < L
        Q, L = torch.where(keep[:, None], Q_new, Q), torch.where(keep, L_new, L)
        P_new = _solve(against(Ga, combine(Gb, Q)), torch.einsum("muv,mu->mv", J, Q))
        L_new = loss(Gb, Ga, J, TT, P_new, Q)
        keep = L_new < L
        P, L = torch.where(keep[:, None], P_new, P), torch.where(keep, L_new, L)
        total = P.sum(-1, keepdim=True)
        gauge = torch.where(total.abs() > 1e-12, total, torch.ones_like(total))
        P, Q = P / gauge, Q * gauge
        if bool(((before - L) <= tol * TT.clamp_min(1e-300)).all()):
            break
    return P, Q, sweeps


def estimate(clients: ClientFactors, scale: float) -> Estimate:
    r, ranks = clients.out_rank, clients.ranks
    s = torch.repeat_interleave(clients.scale_vector, torch.tensor(ranks, device=clients.device))
    Gb = padded_blocks(clients.gram_B * s[:, None] * s[None, :], ranks)
    P, Q, sweeps = solve_weights(Gb, padded_blocks(clients.gram_A, ranks), clients.weights.to(clients.real))
    coef_B = block_coefficients(ranks, Q * clients.scale_vector / scale, r)
    coef_A = block_coefficients(ranks, P, r).mT
    return Estimate(coef_B, coef_A, info={"P": P, "Q": Q, "sweeps": sweeps})


METHOD = Method(name="florana", paper="arXiv:2509.26399", estimate=estimate, wire=full_wire, mixed_ranks=True)
