"""The input of every aggregator: U clients' factors for M modules of one shape, batched."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch
from torch import Tensor

from florana.aggregation import linalg
from florana.errors import FloranaError


@dataclass(frozen=True)
class ClientFactors:
    """Clients' LoRA factors for M modules whose products are all d×k, concatenated along the rank axis.

    B is (M, d, R) and A is (M, R, k) with R = Σ_u r_u; client u owns columns (of B) and rows (of A)
    `blocks[u]`. `scales` are the clients' LoRA scalings s_u, `weights` the aggregation weights w_u (sum 1).
    `global_rank` is the rank asked of the global adapter (0: the largest client rank); methods whose output has
    one rank for every client (all but flora's stack) produce `out_rank` components, zero-padded where they have
    fewer: a run asks for its largest client rank, whichever clients a round sampled.
    The ideal aggregate of module m is ΔW*_m = Σ_u w_u s_u B_u A_u = (B·D)A with D = diag(column_weights).
    Grams and the spectrum of ΔW* are computed once and shared by every method and the report.
    Everything is computed on B's device; `real` is the dtype of the small matrices (float64; float32 on devices
    without float64, see linalg.real_dtype), and `weights` must be on that device in that dtype.
    """

    B: Tensor
    A: Tensor
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    weights: Tensor
    global_rank: int = 0
    real: torch.dtype = torch.float64

    @property
    def device(self) -> torch.device:
        return self.B.device

    @cached_property
    def scale_vector(self) -> Tensor:
        """(U,) the clients' scalings s_u, on the device, in the real dtype."""
        return torch.tensor(self.scales, dtype=self.real, device=self.device)

    @property
    def out_rank(self) -> int:
        """The global adapter's rank for methods that pad: at least the largest client rank."""
        return max(self.global_rank, *self.ranks)

    @property
    def num_clients(self) -> int:
        return len(self.ranks)

    @cached_property
    def blocks(self) -> tuple[slice, ...]:
        ends = list(accumulate(self.ranks))
        return tuple(slice(e - r, e) for e, r in zip(ends, self.ranks))

    @property
    def uniform_rank(self) -> int:
        if len(set(self.ranks)) != 1:
            raise FloranaError(f"clients have different ranks {self.ranks}")
        return self.ranks[0]

    @cached_property
    def column_weights(self) -> Tensor:
        """(R,) w_u·s_u repeated over client u's r_u columns."""
        ws = self.weights.to(self.real) * self.scale_vector
        return torch.repeat_interleave(ws, torch.tensor(self.ranks, device=self.device))

    @cached_property
    def gram_B(self) -> Tensor:
        """(M, R, R) BᵀB of the raw (unweighted) B's."""
        return linalg.gram(self.B, rows=False, dtype=self.real)

    @cached_property
    def gram_A(self) -> Tensor:
        """(M, R, R) A Aᵀ."""
        return linalg.gram(self.A, rows=True, dtype=self.real)

    @cached_property
    def gram_X(self) -> Tensor:
        """Gram of X = B·D, the weighted and scaled B's."""
        D = self.column_weights
        return self.gram_B * D[:, None] * D[None, :]

    @cached_property
    def root_X(self) -> tuple[Tensor, Tensor]:
        """(S, S⁺) with gram_X = SᵀS: X = Q·S for the orthonormal basis Q = X·S⁺ of X's columns."""
        return linalg.sqrt_factor(self.gram_X)

    @cached_property
    def core(self) -> Tensor:
        """S G_A Sᵀ (R×R): ΔW* = Q·Z with Z = S·A, so ΔW*ΔW*ᵀ = Q (S G_A Sᵀ) Qᵀ shares its eigenvalues σ²."""
        S = self.root_X[0]
        return S @ self.gram_A @ S.mT

    @cached_property
    def spectrum(self) -> tuple[Tensor, Tensor]:
        """ΔW*'s squared singular values (descending) and their left singular vectors in the basis Q."""
        lam, V = torch.linalg.eigh(self.core)
        return lam.flip(-1).clamp_min(0), V.flip(-1)

    @cached_property
    def singular_values_sq(self) -> Tensor:
        """ΔW*'s squared singular values, descending (eigenvalues only, unless the vectors exist already)."""
        if "spectrum" in self.__dict__:
            return self.spectrum[0]
        return torch.linalg.eigvalsh(self.core).flip(-1).clamp_min(0)

    @cached_property
    def target_norm_sq(self) -> Tensor:
        """‖ΔW*‖_F² per module (M,)."""
        return (self.gram_X * self.gram_A).sum(dim=(-2, -1))

    def residual_coefficients(self, coef_B: Tensor, coef_A: Tensor, scale: float) -> Tensor:
        """N (M, R, R) with ΔW* − scale·(B·coef_B)(coef_A·A) = B·N·A."""
        return torch.diag(self.column_weights) - scale * (coef_B @ coef_A)

    def error_sq(self, coef_B: Tensor, coef_A: Tensor, scale: float) -> Tensor:
        """‖ΔW* − scale·(B·coef_B)(coef_A·A)‖_F² per module, exactly, from the Grams."""
        return linalg.quad_norm_sq(self.gram_B, self.residual_coefficients(coef_B, coef_A, scale), self.gram_A)

    def output_error_sq(self, B_hat: Tensor, A_hat: Tensor, scale: float) -> Tensor:
        """‖ΔW* − scale·B̂Â‖_F² per module for factors as they were output (rounded to their dtype), from Grams:
        ‖ΔW*‖² − 2·scale·⟨BDA, B̂Â⟩ + scale²·‖B̂Â‖², where ⟨BDA, B̂Â⟩ = Σ_i D_i Σ_j (BᵀB̂)_ij (AÂᵀ)_ij."""
        cross_B = linalg.cross_gram(self.B, B_hat, rows=False, dtype=self.real)
        cross_A = linalg.cross_gram(self.A, A_hat, rows=True, dtype=self.real)
        inner = ((cross_B * cross_A).sum(-1) * self.column_weights).sum(-1)
        norm_sq = (linalg.gram(B_hat, rows=False, dtype=self.real) *
                   linalg.gram(A_hat, rows=True, dtype=self.real)).sum(dim=(-2, -1))
        return (self.target_norm_sq - 2 * scale * inner + scale**2 * norm_sq).clamp_min(0)

    def floor_sq(self, rank: int) -> Tensor:
        """Squared error of the best rank-`rank` approximation of ΔW* (Eckart–Young), per module."""
        return self.singular_values_sq[..., rank:].sum(-1)

    def mean_A_norm(self) -> Tensor:
        """Σ_u w_u ‖A_u‖_F per module: the scale clients trained A at (used to fix a gauge)."""
        diag = torch.diagonal(self.gram_A, dim1=-2, dim2=-1)
        norms = torch.stack([diag[:, b].sum(-1).sqrt() for b in self.blocks], dim=-1)
        return norms @ self.weights.to(self.real)
