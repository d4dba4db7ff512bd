"""The two Gaussian mechanisms as pure functions on tensors.

Sample level (DP-SGD, Abadi et al. 2016, https://arxiv.org/abs/1607.00133): each example's gradient over every
trainable tensor is clipped to L2 norm C, the clipped gradients are summed and N(0, (σC)²) is added to the sum; batches
are Poisson samples (each example in with probability q), the sampling the accountant's amplification assumes.

Client level (DP-FedAvg, McMahan et al. 2018, https://arxiv.org/abs/1710.06963): each client's update (what it sends
minus what it received) is clipped to L2 norm C over all its tensors; the server adds N(0, (σC)²) to the sum of the
clipped updates and divides by a fixed denominator m (the expected number of clients per round), so that adding or
removing one client moves the sum by at most C whatever the others sent.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from torch import Tensor


def dp_seed(seed: int, secret: bool) -> int:
    """The seed of DP's own randomness (Poisson batches, noise): the run's derived seed in a simulation, so that a run
    repeats and resumes exactly; OS entropy on a deployed node or server, where whoever knows the run's seed (the
    server sends it to every node) could otherwise redraw the noise and subtract it."""
    return secrets.randbits(63) if secret else seed


def clip_per_example(grad_samples: list[Tensor], clip: float) -> tuple[list[Tensor], Tensor]:
    """Σ_i g_i·min(1, C/‖g_i‖) for per-example gradients (each tensor (batch, *shape), one per parameter; ‖g_i‖ the
    norm over all of example i's tensors), in float32 whatever the dtype they were computed in; and the per-example
    norms before clipping."""
    flat = [g.detach().float().flatten(1) for g in grad_samples]
    norms = torch.cat(flat, dim=1).norm(dim=1) if flat else torch.zeros(0)
    factor = (clip / (norms + 1e-12)).clamp(max=1.0)
    return [torch.einsum("b,b...->...", factor, g.detach().float()) for g in grad_samples], norms


def gaussian_noise(like: list[Tensor], std: float, generator: torch.Generator) -> list[Tensor]:
    """N(0, std²) of each tensor's shape (float32, on the CPU then moved to the tensor's device: the same draws on
    every device for one seed)."""
    return [torch.randn(t.shape, generator=generator, dtype=torch.float32).mul_(std).to(t.device) for t in like]


def poisson_batches(n: int, rate: float, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` batches, each holding every one of n examples independently with probability `rate` (possibly none)."""
    return [np.flatnonzero(rng.random(n) < rate) for _ in range(steps)]


def update_norm(update: dict[str, Tensor]) -> float:
    """The L2 norm of an update over all its tensors."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.values()))) if update else 0.0


def clip_update(update: dict[str, Tensor], clip: float) -> dict[str, Tensor]:
    """The update scaled to L2 norm at most `clip` (over all its tensors together)."""
    factor = min(1.0, clip / (update_norm(update) + 1e-12))
    return {k: (v.double() * factor).to(v.dtype) for k, v in update.items()}


def dp_fedavg(received: dict[str, Tensor], uploads: list[dict[str, Tensor]], *, clip: float, noise: float,
              denominator: float, generator: torch.Generator) -> dict[str, Tensor]:
    """received + (Σ_u clip(upload_u − received) + N(0, (noise·clip)²)) / denominator: the server's DP-FedAvg step
    over the tensors clients send. The server clips again, so the bound holds whatever a client did; the noise is
    drawn even when no upload arrived (an empty round must look like any other)."""
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in received.items()}
    for up in uploads:
        delta = clip_update({k: up[k].double().cpu() - received[k].double().cpu() for k in received}, clip)
        for k in total:
            total[k] += delta[k]
    keys = list(received)
    drawn = gaussian_noise([received[k] for k in keys], noise * clip, generator)
    return {k: (received[k].double().cpu() + (total[k] + z.double().cpu()) / denominator).to(received[k].dtype)
            for k, z in zip(keys, drawn)}
