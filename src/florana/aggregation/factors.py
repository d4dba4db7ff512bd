"""The input of every aggregator: U clients' factors for M modules of one shape, batched."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from florana.aggregation import linalg
from florana.errors import FloranaError


@dataclass(frozen=True)
class ClientFactors:
    """Clients' LoRA factors for M modules whose products are all d×k, concatenated along the rank axis.

    B is (M, d, R) and A is (M, R, k) with R = Σ_u r_u; client u owns columns (of B) and rows (of A)
    `blocks[u]`. `scales` are the clients' LoRA scalings s_u, `weights` the aggregation weights w_u (sum 1).
    The ideal aggregate of module m is ΔW*_m = Σ_u w_u s_u B_u A_u = (B·D)A with D = diag(column_weights).
    Grams and the spectrum of ΔW* are computed once and shared by every method and the report.
    """

    B: Tensor
    A: Tensor
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    weights: Tensor

    @property
    def num_clients(self) -> int:
        return len(self.ranks)

    @cached_property
    def blocks(self) -> tuple[slice, ...]:
        ends = torch.tensor(self.ranks).cumsum(0).tolist()
        return tuple(slice(e - r, e) for e, r in zip(ends, self.ranks))

    @property
    def uniform_rank(self) -> int:
        if len(set(self.ranks)) != 1:
            raise FloranaError(f"clients have different ranks {self.ranks}")
        return self.ranks[0]

    @cached_property
    def column_weights(self) -> Tensor:
        """(R,) float64: w_u·s_u repeated over client u's r_u columns."""
        ws = self.weights.to(torch.float64) * torch.tensor(self.scales, dtype=torch.float64)
        return torch.repeat_interleave(ws, torch.tensor(self.ranks))

    @cached_property
    def gram_B(self) -> Tensor:
        """(M, R, R) float64 BᵀB of the raw (unweighted) B's."""
        return linalg.gram(self.B, rows=False)

    @cached_property
    def gram_A(self) -> Tensor:
        """(M, R, R) float64 A Aᵀ."""
        return linalg.gram(self.A, rows=True)

    @cached_property
    def gram_X(self) -> Tensor:
        """Gram of X = B·D, the weighted and scaled B's."""
        D = self.column_weights
        return self.gram_B * D[:, None] * D[None, :]

    @cached_property
    def roots(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Square-root factors (S, S⁺ᵀ) of gram_X and gram_A (see linalg.sqrt_factor)."""
        return linalg.sqrt_factor(self.gram_X), linalg.sqrt_factor(self.gram_A)

    @cached_property
    def core_svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """SVD of the R×R core S_X S_Aᵀ: ΔW* = Q_X (U Σ Vᵀ) Q_Aᵀ with orthonormal Q's, so Σ is ΔW*'s spectrum."""
        (S_x, _), (S_a, _) = self.roots
        return torch.linalg.svd(S_x @ S_a.mT)

    @cached_property
    def target_norm_sq(self) -> Tensor:
        """‖ΔW*‖_F² per module (M,)."""
        D = torch.diag(self.column_weights).expand(self.B.shape[0], -1, -1)
        return linalg.quad_norm_sq(self.gram_B, D, self.gram_A)

    def error_sq(self, coef_B: Tensor, coef_A: Tensor, scale: float) -> Tensor:
        """‖ΔW* − scale·(B·coef_B)(coef_A·A)‖_F² per module, exactly, from the Grams."""
        N = torch.diag(self.column_weights) - scale * (coef_B @ coef_A)
        return linalg.quad_norm_sq(self.gram_B, N, self.gram_A)

    def floor_sq(self, rank: int) -> Tensor:
        """Squared error of the best rank-`rank` approximation of ΔW* (Eckart–Young), per module."""
        return linalg.tail_energy(self.core_svd[1], rank)

    def mean_A_norm(self) -> Tensor:
        """Σ_u w_u ‖A_u‖_F per module: the scale clients trained A at (used to fix a gauge)."""
        diag = torch.diagonal(self.gram_A, dim1=-2, dim2=-1)
        norms = torch.stack([diag[:, b].sum(-1).sqrt() for b in self.blocks], dim=-1)
        return norms @ self.weights.to(torch.float64)
