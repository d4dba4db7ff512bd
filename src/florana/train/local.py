"""A client's local training: a fresh AdamW over its trainable adapter tensors, `steps` seeded batches.

The optimizer starts fresh every round (as in FedIT, FLoRA-NA and Flower's examples), so a client owns no
state between rounds beyond what its method keeps (fedsa's B, the `local` bound's adapter); its optimizer state and
gradients are freed when train_steps returns (on a GPU, the next client's peak does not carry them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from florana.train.device import Precision


def batch_indices(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` batches drawn epoch by epoch from a seeded permutation of n examples."""
    out: list[np.ndarray] = []
    order = np.empty(0, dtype=int)
    while len(out) < steps:
        if len(order) < min(batch_size, n):
            order = np.concatenate([order, rng.permutation(n)])
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def train_steps(model, params: list[torch.Tensor], make_batch: Callable, batches: list[np.ndarray], *, lr: float,
                weight_decay: float, precision: Precision, on_step: Callable[[], None] | None = None) -> float:
    """Run the steps under the precision's autocast (float16 with loss scaling: a step whose scaled gradients
    overflow is skipped, as GradScaler does); return the mean loss, or NaN as soon as a loss is not finite (the
    update is then rejected)."""
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scaler = precision.scaler()
    total = 0.0
    for idx in batches:
        with precision.autocast():
            loss = model(**make_batch(idx)).loss
        value = loss.item()
        if not math.isfinite(value):
            return math.nan
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        total += value
        if on_step:
            on_step()
    return total / max(len(batches), 1)
