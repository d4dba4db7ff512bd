"""FedSVD: clients train B only (A frozen and shared, as in FFA-LoRA); the server averages B and, every few rounds,
re-factors the global product by SVD: A ← V_rᵀ (orthonormal rows), B ← U_rΣ_r, so that A adapts after all.

Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA", NeurIPS 2025,
https://arxiv.org/abs/2505.12805; code github.com/seanie12/fed-svd (misc/utils.py `reinit_lora`, called by
fedmm/fedavg/server.py after the round's averaging when (round + 1) % recalculate_svd_period == 0). Exact: with A
shared, Σ_u w_u s_u B_u A = B̄A, and the re-factoring keeps the product. B goes up and down every round; A comes down
only after a re-factoring (and to a client that missed one).

Factor space: A = SᵀQᵀ (Q orthonormal k×r, S from A's r×r Gram) and B̄Sᵀ = UΣWᵀ (W from its r×r Gram
S G_B̄ Sᵀ = WΣ²Wᵀ), so B̄A = UΣ·(WᵀQᵀ): A_new = WᵀQᵀ = Wᵀ(S⁺)ᵀA and B_new = UΣ = B̄SᵀW, combinations of the
clients' factors found with r×r matrices; no d×k product, no d×k SVD.

What the paper leaves open, and our choices (`fedsvd_period`, default 1: the code's default period):
- The server re-factors after rounds t with t % fedsvd_period == 0 (the code's rule, rounds counted from 1); the
  code's `svd_warmup_steps` (default 0) is not offered. Differential privacy (the paper's setting) is not part of it.
- The SVD is of B̄A, the unscaled product (as `reinit_lora` does); the LoRA scaling stays on the adapter.
- Singular vectors come from a symmetric eigen-solver, sorted by decreasing singular value; their signs are the
  solver's (deterministic on one machine). Directions beyond B̄'s rank keep orthonormal rows of A.
- In other rounds the global A is client 0's copy, bit for bit, and B̄ the weighted mean (ffa's rule).
- A client that missed a re-factoring receives the new A when it is next sampled (the engine's catch-up).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch

from florana.aggregation import ffa
from florana.aggregation.base import Estimate, Method, factor_wire
from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import sqrt_factor


def refactor(clients: ClientFactors, scale: float) -> Estimate:
    """ffa's B̄ and shared A, re-factored as B̄A = (UΣ)(Vᵀ) with orthonormal rows of the new A."""
    mean = ffa.estimate(clients, scale)
    coef_B, coef_A = mean.coef_B, mean.coef_A  # B̄ = B·coef_B, A = coef_A·A (client 0's copy)
    S, S_pinv = sqrt_factor(coef_A @ clients.gram_A @ coef_A.mT)  # A Aᵀ = SᵀS, Aᵀ = Q S
    gram_Bbar = coef_B.mT @ clients.gram_B @ coef_B
    W = torch.linalg.eigh(S @ gram_Bbar @ S.mT)[1].flip(-1)  # decreasing singular values
    return Estimate(coef_B @ S.mT @ W, W.mT @ S_pinv.mT @ coef_A)


def by_round(method: Method, round_: int, period: int = 1) -> Method:
    """Round `round_`: B trains; the server re-factors after it when round_ % period == 0, and A comes down at the
    start of a round that follows a re-factoring."""
    now = round_ % period == 0
    before = round_ > 1 and (round_ - 1) % period == 0
    return replace(method, estimate=refactor if now else ffa.estimate, wire=factor_wire("B", "AB" if now else "B"),
                   down=frozenset("AB" if before else "B"), by_round=None)


def configure(method: Method, period: int = 1) -> Method:
    return replace(method, by_round=partial(by_round, period=period))


METHOD = Method(name="fedsvd", paper="arXiv:2505.12805", estimate=refactor, wire=factor_wire("B", "AB"), exact=True,
                trains_A=False, down=frozenset("AB"), by_round=by_round, configure=configure,
                sum_shaped=True)
