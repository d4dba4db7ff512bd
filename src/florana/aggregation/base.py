"""The common interface of the aggregators: a method turns ClientFactors into an Estimate, a pure function.

Every method's global factors are linear combinations of the clients' own:
B̂ = B·coef_B and Â = coef_A·A, with B̂ already divided by the output scaling. This one form lets a single
piece of code apply any method, measure its exact error in factor space and count what it sends.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from florana.aggregation.factors import ClientFactors
from florana.aggregation.linalg import block_coefficients
from florana.errors import FloranaError


@dataclass(frozen=True)
class Estimate:
    """A method's answer for one group of modules.

    coef_B (M, R, r_out), coef_A (M, r_out, R): the global factors as combinations of the clients' factors.
    info: per-method diagnostics for the report (florana's P, Q and iterations), JSON-friendly once listed.
    """

    coef_B: Tensor
    coef_A: Tensor
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Wire:
    """Values one client sends up and receives down for one module in one round."""

    up: int
    down: int


@dataclass(frozen=True)
class Method:
    """A federated-LoRA aggregator and the training semantics that go with it.

    name: registry key. paper: citation. estimate(clients, scale) -> Estimate, where scale is the
    output adapter's LoRA scaling. out_rank(ranks) -> the global adapter's rank (flora's Σ r_u; the others' largest
    client rank, or `clients.out_rank` when a run asks for more). wire(r_u, r_out, d, k) -> Wire.
    mixed_ranks: accepts clients of different ranks (those that pad send client u the first r_u components of
    the global factors, so it downloads at its own rank). exact: the update it applies equals ΔW* (given its
    preconditions). trains_A / trains_B / personal_B / merges / residual: how clients train under it (ffa freezes
    A; fedsa keeps each client's B; flora merges the product into the base and restarts LoRA each round; fedex adds
    the dense residual ΔW* − scale·B̂Â to the base).

    Methods whose protocol changes from round to round (rolora alternates the factor that trains, fedsvd re-factors
    every few rounds) give `by_round(method, round_) -> Method`: the method as it acts in that round, with the
    flags above, its estimate and wire for the aggregation that closes the round, and `down`, the factors a client
    that took part in the round before receives as the round starts (where that is not simply what it trains). The
    method itself, unspecialised, describes every round at once: a factor it trains or sends is one some round
    trains or sends. `configure(method, **options)` gives the method with options (lora_fair's λ, fedsvd's
    period; federation/methods.py maps run config keys to them). `summarize(info) -> {name: float}` reduces its
    per-module diagnostics (Estimate.info's tensors, concatenated over all modules) to the round's, which the run
    records in metrics.jsonl (florana's P, Q and sweeps).

    sum_shaped: the server step needs only the clients' weighted sum of what they upload (each client's factors
    at the global rank, its scaling folded into B): estimate(clients) equals estimate of one client holding that
    mean. Secure aggregation (the server sees only the sum) and client-level DP (noise on the sum) need it.
    needs_each_client: for the others, why the server needs each client's own factors (shown to users).
    """

    name: str
    paper: str
    estimate: Callable[[ClientFactors, float], Estimate]
    wire: Callable[[int, int, int, int], Wire]
    out_rank: Callable[[Sequence[int]], int] = max
    mixed_ranks: bool = False
    exact: bool = False
    trains_A: bool = True
    trains_B: bool = True
    personal_B: bool = False
    merges: bool = False
    residual: bool = False
    down: frozenset[str] | None = None
    by_round: Callable[[Method, int], Method] | None = None
    configure: Callable[..., Method] | None = None
    summarize: Callable[[dict[str, Tensor]], dict[str, float]] | None = None
    sum_shaped: bool = False
    needs_each_client: str = ""

    def __post_init__(self):
        if self.sum_shaped == bool(self.needs_each_client):
            raise ValueError(f"method {self.name}: give needs_each_client exactly when it is not sum_shaped")

    @property
    def changes_base(self) -> bool:
        """The method changes the frozen base weights (flora, fedex)."""
        return self.merges or self.residual

    @property
    def varies(self) -> bool:
        """Its protocol depends on the round, so a client may receive only part of the global factors and keeps
        the rest from earlier rounds (rolora, fedsvd)."""
        return self.by_round is not None

    @property
    def feeds_back(self) -> bool:
        """Error feedback makes sense: the method loses part of ΔW* (it is not exact), its server sees both
        factors (not fedsa) and keeps no dense base change of its own (not flora, fedex)."""
        return not (self.exact or self.personal_B or self.changes_base)

    def at_round(self, round_: int) -> Method:
        """The method as it acts in round `round_` (1-based); itself where every round is alike."""
        return self if self.by_round is None else self.by_round(self, round_)

    def configured(self, **options) -> Method:
        """The method with these options; an error for a method that takes none."""
        if not options:
            return self
        if self.configure is None:
            raise FloranaError(f"{self.name} takes no options, got {', '.join(sorted(options))}")
        known = list(inspect.signature(self.configure).parameters)[1:]
        if unknown := sorted(set(options) - set(known)):
            raise FloranaError(f"{self.name} has no option {', '.join(unknown)}; its options: {', '.join(known)}")
        return self.configure(self, **options)

    def trains(self, factor: str) -> bool:
        """Whether clients train lora_A ('A') or lora_B ('B')."""
        return self.trains_A if factor == "A" else self.trains_B

    def sends(self, factor: str, *, up: bool) -> bool:
        """Whether a client's lora_A ('A') or lora_B ('B') crosses the wire up, or the global one down. ffa's A
        is frozen and fedsa's B personal, so neither travels; flora's server sends its stacked factors as a base
        change, never as the global LoRA, which every client restarts each round; rolora sends down the factor
        its clients hold frozen this round."""
        if not up and self.down is not None:
            return factor in self.down
        kept = self.trains(factor) and not (factor == "B" and self.personal_B)
        return kept and (up or not self.merges)


def full_wire(r: int, r_out: int, d: int, k: int) -> Wire:
    """Both factors up and both down: FedIT's cost, which FLoRA-NA and svd keep. A client of rank r below the
    global rank r_out receives the first r components of the global factors: r(d+k) each way."""
    return Wire(up=r * (d + k), down=min(r, r_out) * (d + k))


def factor_wire(up: str, down: str) -> Callable[[int, int, int, int], Wire]:
    """The cost of sending the factors named in `up` and `down` ('A', 'B', 'AB'): B is d×r, A is r×k. A client of
    rank r below the global rank r_out receives the first r components of the global factors, as in full_wire."""
    def size(factors: str, r: int, d: int, k: int) -> int:
        return r * ((d if "B" in factors else 0) + (k if "A" in factors else 0))

    return lambda r, r_out, d, k: Wire(up=size(up, r, d, k), down=size(down, min(r, r_out), d, k))


def weighted_mean_coefficients(clients: ClientFactors, scale: float, r_out: int,
                               weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """FedIT's combination: B̂ = Σ w_u s_u B_u / scale, Â = Σ w_u A_u, smaller ranks zero-padded to r_out
    (HetLoRA's padding). `weights` (M, U) replace the clients' weights per module (hetlora's)."""
    M = clients.B.shape[0]
    w = (clients.weights if weights is None else weights).to(clients.real).expand(M, -1)
    s = clients.scale_vector
    coef_B = block_coefficients(clients.ranks, w * s / scale, r_out)
    coef_A = block_coefficients(clients.ranks, w, r_out).mT
    return coef_B, coef_A


def client_weights(weights: Sequence[float] | Tensor | None, num_clients: int) -> Tensor:
    """Validated aggregation weights (float64 on the CPU, sum 1): uniform when None, else non-negative finite ones."""
    if num_clients < 1:
        raise FloranaError("aggregation needs at least one client")
    if weights is None:
        return torch.full((num_clients,), 1.0 / num_clients, dtype=torch.float64, device="cpu")
    w = torch.as_tensor(weights, dtype=torch.float64, device="cpu").flatten()
    if w.numel() != num_clients:
        raise FloranaError(f"got {w.numel()} client weights for {num_clients} clients")
    bad = [i for i, x in enumerate(w.tolist()) if not math.isfinite(x) or x < 0]
    if bad:
        raise FloranaError(f"client weights must be finite and >= 0; client {bad[0]} has {w[bad[0]].item()}")
    if w.sum() <= 0:
        raise FloranaError("client weights are all zero")
    return w / w.sum()
