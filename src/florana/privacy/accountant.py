"""ε at δ from Opacus's RDP accountant (Rényi DP of the subsampled Gaussian mechanism, Mironov et al. 2019,
https://arxiv.org/abs/1908.10530), and the noise multiplier that meets a target ε.

A run accounts per *unit*: at sample level each client (its examples are what is protected; q_u = batch_size / N_u,
local_steps mechanism steps per round it takes part in, δ_u = 1/N_u unless dp_delta gives one); at client level the
federation as one unit (a client is what is protected; q = sample_fraction, one step per round, δ = 1/num_clients
unless given), so every client has the same ε. Each unit has its own noise multiplier σ_u: the one given
(dp_noise), or the smallest that keeps *that* unit within the target ε, as each client's own Opacus
`make_private_with_epsilon` would calibrate it. One σ for all would be set by the client with the fewest examples
(the highest sample rate) and leave the others far below their budget with far more noise than they need. A unit's
state is the number of rounds charged to it: (σ_u, q_u, steps·rounds) is the accountant's whole history, JSON in a
checkpoint. Opacus is imported where ε is computed, not with the module: importing it costs seconds (its
optimizers pull in torch.distributed and scipy), which every run and every Flower message process would pay
without DP.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from florana.errors import FloranaError

FEDERATION = -1  # the one unit of client-level accounting


def epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    """ε at δ after `steps` Poisson-subsampled Gaussian steps of noise multiplier `noise` and sample rate `rate`."""
    if steps <= 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise, rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise(target: float, rate: float, steps: int, delta: float) -> float:
    """The noise multiplier whose ε after `steps` steps is at most `target` (and within 1% of it)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=rate, steps=steps,
                                          accountant="rdp", epsilon_tolerance=0.01 * target))
    except ValueError:
        raise FloranaError(f"dp_epsilon={target} cannot be met at δ={delta:g} over {steps} steps at sample rate "
                           f"{rate:g}, whatever the noise") from None


@dataclass(frozen=True)
class PrivacyPlan:
    """A run's DP: the mode ('sample' or 'client'), the clip bound C, the target ε (None: no budget), the mechanism
    steps per round a unit takes part in, and each unit's noise multiplier σ_u (noise std σ_u·C on a sum), sample
    rate and δ."""

    mode: str
    clip: float
    noise: dict[int, float]
    target: float | None
    steps: int
    rates: dict[int, float]
    deltas: dict[int, float]

    def epsilon(self, unit: int, rounds: int) -> float:
        """Unit's ε at its δ after taking part in `rounds` rounds."""
        return epsilon(self.noise[unit], self.rates[unit], self.steps * rounds, self.deltas[unit])

    def noise_to_clip(self, unit: int, size: int, trained: int) -> float:
        """A DP-SGD step's noise on the mean gradient, as a multiple of the clip bound: the noise on the sum has
        norm ≈ σ_u·C·√d over d trained values and the sum is divided by the expected batch q_u·N_u, while the mean
        of clipped gradients has norm at most C. Above ~1 a step is mostly noise; a larger batch lowers it."""
        return self.noise[unit] * trained ** 0.5 / (self.rates[unit] * size)

    def joined(self, other: PrivacyPlan) -> PrivacyPlan:
        """This plan with `other`'s units added (a node with its own data, known once it has said its count); the
        units' σ, q and δ do not depend on each other, so nothing already planned changes."""
        return replace(self, noise={**self.noise, **other.noise}, rates={**self.rates, **other.rates},
                       deltas={**self.deltas, **other.deltas})

    def over_budget(self, units: list[int], spent: dict[int, int]) -> tuple[int, float] | None:
        """The first of `units` whose ε would exceed the target after one more round, with that ε; None if none
        would (or there is no target)."""
        if self.target is None:
            return None
        for u in units:
            eps = self.epsilon(u, spent.get(u, 0) + 1)
            if eps > self.target:
                return u, eps
        return None


def _noise(noise: float | None, target: float | None, rates: dict[int, float], deltas: dict[int, float],
           steps: int) -> dict[int, float]:
    """Each unit's noise multiplier: the given one, or the smallest that keeps the unit within the target over
    `steps` steps."""
    if noise is not None:
        return {u: noise for u in rates}
    return {u: calibrate_noise(target, rates[u], steps, deltas[u]) for u in rates}


def sample_level_plan(*, clip: float, noise: float | None, target: float | None, delta: float | None,
                      batch_size: int, local_steps: int, rounds: int, sizes: dict[int, int]) -> PrivacyPlan:
    """DP-SGD at each client of `sizes` (client → training examples, clients without data left out). With only a
    target, each client's σ_u is calibrated so that it ends within the target if it takes part in every round."""
    rates = {u: min(1.0, batch_size / n) for u, n in sizes.items()}
    deltas = {u: delta if delta is not None else 1.0 / n for u, n in sizes.items()}
    return PrivacyPlan("sample", clip, _noise(noise, target, rates, deltas, local_steps * rounds), target,
                       local_steps, rates, deltas)


def client_level_plan(*, clip: float, noise: float | None, target: float | None, delta: float | None,
                      sample_fraction: float, rounds: int, num_clients: int) -> PrivacyPlan:
    """DP-FedAvg: the federation is one unit, sampled clients at rate sample_fraction, one server step per round."""
    rates = {FEDERATION: sample_fraction}
    deltas = {FEDERATION: delta if delta is not None else 1.0 / num_clients}
    return PrivacyPlan("client", clip, _noise(noise, target, rates, deltas, rounds), target, 1, rates, deltas)
