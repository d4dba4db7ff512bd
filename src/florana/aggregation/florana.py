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

Options (run config keys `florana_*`); the multi-seed evidence sweep kept the above except for the proximal term:
- solver "gradient" (`florana_steps`, `florana_lr`): instead of ALS to convergence, a few alternating gradient
  steps from FedIT's start (the weights "learned", as the paper words it). Each block (Q for fixed P, then P) is
  a quadratic with Hessian 2H, so its gradient is Lipschitz with constant 2·λ_max(H); the step is lr/(2·λ_max(H)),
  which lowers the objective for any lr in (0, 2) (lr = 1: the descent lemma's step).
- prox λ ≥ 0 (`florana_prox`, default 10; 0 is the paper's Eq. 6 alone): adds λ·‖ΔW*‖²·(‖P − w‖² + ‖Q − w‖²)
  (λ relative to ‖ΔW*‖², so one value fits every module and round), pulling towards FedIT's weights. Without it,
  FLoRA-NA ended near the majority answer on three of six Rotten Tomatoes partitions where FedIT learned; with
  λ = 10 it ended within 0.02 of FedIT's accuracy on all six, its aggregation error still below FedIT's. The
  objective stays quadratic in each block, so the ALS half-steps stay exact
  ((H + λ‖ΔW*‖²I) Q = JP + λ‖ΔW*‖²w). The term is not gauge-invariant: with λ > 0
  the in-loop normalisation Σ P = 1 is replaced by the c minimising the proximal term along the gauge (c·P, Q/c)
  (without it ALS crawls along that weakly curved direction: on the default's round 1, λ = 0.1 ran into the
  200-sweep cap in every module), and the chosen gauge is applied once, at the end.
- gauge (`florana_gauge`), applied to the solution, which changes the split between Â and B̂, never s·B̂Â:
  "sum_p" (Σ_u P_u = 1), "balanced" (‖Â‖_F = ‖B̂‖_F for the factors as the adapter stores them; gradient flow on
  B and A conserves ‖B‖² − ‖A‖²), "client_norm" (‖Â‖_F = Σ_u w_u ‖A_u‖_F, as svd's split), "fedit_norm"
  (‖Â‖_F = ‖Σ_u w_u A_u‖_F, FedIT's Â on the same updates: the estimate's product with FedIT's factor scale, so
  that a run's ‖Â‖ cannot drift from FedIT's round after round).
Diagnostics per module (the report's modules) and over modules (`summarize`: metrics.jsonl): P and Q's extremes,
Σ P, Σ Q, the gauge-free Σ P·Σ Q (FedIT's is 1; were every client's update the same B·A, the server's would be
Σ P·Σ Q times it: a scalar summary of how far the server steps relative to FedIT), and the sweeps (or gradient
steps) run.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import Tensor

from florana.aggregation.base import Estimate, Method, full_wire
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import block_coefficients, padded_blocks, rescaling
from florana.errors import FloranaError

MAX_ITER = 200
TOL = 1e-10
RIDGE = 1e-12
SOLVERS = ("als", "gradient")
GAUGES = ("sum_p", "balanced", "client_norm", "fedit_norm")
STEPS, LR = 10, 1.0  # the gradient solver's defaults: ten Q-then-P steps of the descent lemma's size
PROX = 10.0  # the default λ: the evidence sweep's choice (README, "Does FLoRA-NA help?")


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


def _block_Q(Gb: Tensor, Ga: Tensor, J: Tensor, P: Tensor, mu: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """For fixed P the objective is QᵀHQ − 2Qᵀg + const (prox folded in): (H, g)."""
    U = P.shape[-1]
    H = against(Gb, combine(Ga, P)) + mu[:, None, None] * torch.eye(U, dtype=P.dtype, device=P.device)
    return H, torch.einsum("muv,mv->mu", J, P) + mu[:, None] * w


def _block_P(Gb: Tensor, Ga: Tensor, J: Tensor, Q: Tensor, mu: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """For fixed Q the objective is PᵀHP − 2Pᵀg + const (prox folded in): (H, g)."""
    U = Q.shape[-1]
    H = against(Ga, combine(Gb, Q)) + mu[:, None, None] * torch.eye(U, dtype=Q.dtype, device=Q.device)
    return H, torch.einsum("muv,mu->mv", J, Q) + mu[:, None] * w


def objective(Gb: Tensor, Ga: Tensor, J: Tensor, TT: Tensor, P: Tensor, Q: Tensor, w: Tensor,
              prox: float = 0.0) -> Tensor:
    """L(P, Q) + prox·‖ΔW*‖²·(‖P − w‖² + ‖Q − w‖²) per module."""
    value = loss(Gb, Ga, J, TT, P, Q)
    if prox:
        value = value + prox * TT * ((P - w).pow(2).sum(-1) + (Q - w).pow(2).sum(-1))
    return value


def solve_weights(Gb: Tensor, Ga: Tensor, w: Tensor, max_iter: int = MAX_ITER, tol: float = TOL,
                  prox: float = 0.0):
    """ALS for Eq. 6 (plus the proximal term) from FedIT's start, on block Grams (M, U, r, U, r) of b = s·B and A.
    Returns P, Q (M, U) and, per module, the sweep after which it first improved by at most tol·‖ΔW*‖² (M,)."""
    M, U = Gb.shape[0], Gb.shape[1]
    J, TT = cross_terms(Gb, Ga, w)
    mu = prox * TT
    P = w.expand(M, U).clone()
    Q = P.clone()
    L = objective(Gb, Ga, J, TT, P, Q, w, prox)
    converged_at = torch.zeros(M, dtype=torch.long, device=P.device)
    sweeps = 0
    for sweeps in range(1, max_iter + 1):
        before = L
        Q_new = _solve(*_block_Q(Gb, Ga, J, P, mu, w))
        L_new = objective(Gb, Ga, J, TT, P, Q_new, w, prox)
        keep = L_new < L
        Q, L = torch.where(keep[:, None], Q_new, Q), torch.where(keep, L_new, L)
        P_new = _solve(*_block_P(Gb, Ga, J, Q, mu, w))
        L_new = objective(Gb, Ga, J, TT, P_new, Q, w, prox)
        keep = L_new < L
        P, L = torch.where(keep[:, None], P_new, P), torch.where(keep, L_new, L)
        if prox:  # L is flat along the gauge, the proximal term is not: ALS alone crawls along it
            P, Q = prox_gauge(P, Q, w)
            L = objective(Gb, Ga, J, TT, P, Q, w, prox)
        else:
            P, Q = sum_p_gauge(P, Q)
        settled = (before - L) <= tol * TT.clamp_min(1e-300)
        converged_at = torch.where(settled & (converged_at == 0), sweeps, converged_at)
        if bool(settled.all()):
            break
    return P, Q, torch.where(converged_at == 0, sweeps, converged_at)


def prox_gauge(P: Tensor, Q: Tensor, w: Tensor, iters: int = 20) -> tuple[Tensor, Tensor]:
    """(c·P, Q/c), which keeps L, with c > 0 minimising ‖cP − w‖² + ‖Q/c − w‖² (Newton from c = 1, each step kept
    within [c/2, 2c]; c = 1 where it does not lower that sum)."""
    a, b, e, g = P.pow(2).sum(-1), (P * w).sum(-1), Q.pow(2).sum(-1), (Q * w).sum(-1)

    def f(c):
        return a * c * c - 2 * b * c + e / (c * c) - 2 * g / c

    c = torch.ones_like(a)
    for _ in range(iters):
        d1 = 2 * a * c - 2 * b - 2 * e / c**3 + 2 * g / c**2
        d2 = 2 * a + 6 * e / c**4 - 4 * g / c**3
        step = torch.where(d2 > 0, d1 / d2.where(d2 > 0, 1.0), 0.0)
        c = torch.minimum(torch.maximum(c - step, c / 2), 2 * c)
    c = torch.where(f(c) < f(torch.ones_like(c)), c, 1.0)
    return P * c[:, None], Q / c[:, None]


def gradient_weights(Gb: Tensor, Ga: Tensor, w: Tensor, steps: int = STEPS, lr: float = LR,
                     prox: float = 0.0) -> tuple[Tensor, Tensor]:
    """`steps` alternating gradient steps (Q, then P) on Eq. 6 (plus the proximal term) from FedIT's start, each of
    size lr/(2·λ_max(H)) for its block's Hessian 2H: the objective decreases at every step for lr in (0, 2)."""
    M, U = Gb.shape[0], Gb.shape[1]
    J, TT = cross_terms(Gb, Ga, w)
    mu = prox * TT
    P = w.expand(M, U).clone()
    Q = P.clone()

    def step(x: Tensor, H: Tensor, g: Tensor) -> Tensor:
        grad = 2 * (torch.einsum("muw,mw->mu", H, x) - g)
        lipschitz = 2 * torch.linalg.eigvalsh(H)[:, -1]
        ok = lipschitz > 0  # H = 0: every factor of the other block is zero, nothing to learn
        return x - torch.where(ok, lr / lipschitz.where(ok, 1.0), 0.0)[:, None] * grad

    for _ in range(steps):
        Q = step(Q, *_block_Q(Gb, Ga, J, P, mu, w))
        P = step(P, *_block_P(Gb, Ga, J, Q, mu, w))
    return P, Q


def sum_p_gauge(P: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """(P/c, c·Q) with c = Σ_u P_u (left alone where it vanishes): Σ_u P_u = 1."""
    total = P.sum(-1, keepdim=True)
    c = torch.where(total.abs() > 1e-12, total, torch.ones_like(total))
    return P / c, Q * c


def factor_norms(Gb: Tensor, Ga: Tensor, P: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """‖Σ_u Q_u b_u‖_F and ‖Σ_u P_u A_u‖_F per module, from the block Grams."""
    norm_b = torch.diagonal(combine(Gb, Q), dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()
    norm_A = torch.diagonal(combine(Ga, P), dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()
    return norm_b, norm_A


def fix_gauge(gauge: str, P: Tensor, Q: Tensor, Gb: Tensor, Ga: Tensor, scale: float, w: Tensor,
              client_norm_A: Tensor) -> tuple[Tensor, Tensor]:
    """(c·P, Q/c), which leaves every Q_u P_v and so s·B̂Â unchanged, with c chosen by `gauge` (see GAUGES); B̂ is
    Σ Q_u b_u / scale, as the adapter stores it."""
    if gauge == "sum_p":
        return sum_p_gauge(P, Q)
    norm_b, norm_A = factor_norms(Gb, Ga, P, Q)
    if gauge == "fedit_norm":  # FedIT's ‖Σ w_u A_u‖_F, from the same Grams
        c = rescaling("client_norm", norm_b / scale, norm_A, factor_norms(Gb, Ga, w.expand_as(P), w.expand_as(Q))[1])
    else:
        c = rescaling(gauge, norm_b / scale, norm_A, client_norm_A)
    return P * c[:, None], Q / c[:, None]


def estimate(clients: ClientFactors, scale: float, solver: str = "als", steps: int = STEPS, lr: float = LR,
             prox: float = PROX, gauge: str = "sum_p") -> Estimate:
    check_options(solver, steps, lr, prox, gauge)
    r, ranks = clients.out_rank, clients.ranks
    s = torch.repeat_interleave(clients.scale_vector, torch.tensor(ranks, device=clients.device))
    Gb = padded_blocks(clients.gram_B * s[:, None] * s[None, :], ranks)
    Ga = padded_blocks(clients.gram_A, ranks)
    w = clients.weights.to(clients.real)
    if solver == "als":
        P, Q, sweeps = solve_weights(Gb, Ga, w, prox=prox)
    else:
        P, Q = gradient_weights(Gb, Ga, w, steps, lr, prox)
        sweeps = torch.full((P.shape[0],), steps, device=P.device)
    P, Q = fix_gauge(gauge, P, Q, Gb, Ga, scale, w, clients.mean_A_norm())
    coef_B = block_coefficients(ranks, Q * clients.scale_vector / scale, r)
    coef_A = block_coefficients(ranks, P, r).mT
    return Estimate(coef_B, coef_A, info={"P": P, "Q": Q, "sweeps": sweeps})


def summarize(info: dict[str, Tensor]) -> dict[str, float]:
    """Over all modules of a round: P's and Q's smallest and largest entries, the mean Σ P, Σ Q and Σ P·Σ Q, and
    the mean and largest number of sweeps."""
    P, Q, sweeps = info["P"], info["Q"], info["sweeps"].to(info["P"].dtype)
    sum_P, sum_Q = P.sum(-1), Q.sum(-1)
    values = {"p_min": P.min(), "p_max": P.max(), "p_sum": sum_P.mean(), "q_min": Q.min(), "q_max": Q.max(),
              "q_sum": sum_Q.mean(), "pq_sum": (sum_P * sum_Q).mean(), "sweeps_mean": sweeps.mean(),
              "sweeps_max": sweeps.max()}
    return {f"florana_{k}": v.item() for k, v in values.items()}


def check_options(solver: str, steps: int, lr: float, prox: float, gauge: str) -> None:
    if solver not in SOLVERS:
        raise FloranaError(f"florana solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if gauge not in GAUGES:
        raise FloranaError(f"florana gauge must be one of {', '.join(GAUGES)}, got {gauge!r}")
    if steps < 1 or not 0 < lr < 2 or prox < 0:
        raise FloranaError(f"florana needs steps >= 1, lr in (0, 2) and prox >= 0, got steps={steps}, lr={lr}, "
                           f"prox={prox}")


def configure(method: Method, solver: str = "als", steps: int = STEPS, lr: float = LR, prox: float = PROX,
              gauge: str = "sum_p") -> Method:
    check_options(solver, steps, lr, prox, gauge)
    return replace(method, estimate=partial(estimate, solver=solver, steps=steps, lr=lr, prox=prox, gauge=gauge))


METHOD = Method(name="florana", paper="arXiv:2509.26399", estimate=estimate, wire=full_wire, mixed_ranks=True,
                configure=configure, summarize=summarize,
                needs_each_client="its weights P, Q solve a least-squares problem over the cross-client Gram "
                                  "matrices B_uᵀB_v and A_u A_vᵀ, which need each client's factors")
