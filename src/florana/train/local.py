"""A client's local training: a fresh AdamW over its trainable adapter tensors, `steps` seeded batches.

The optimizer starts fresh every round (as in FedIT, FLoRA-NA and Flower's examples), so a client owns no
state between rounds beyond what its method keeps (fedsa's B, the `local` bound's adapter); its optimizer state and
gradients are freed when train_steps returns (on a GPU, the next client's peak does not carry them).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext

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


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's own loss (float32): cross-entropy on its class label, or for a causal LM the mean
    cross-entropy over its answer tokens (labels shifted by one, IGNORE positions left out). Under DP-SGD the loss
    is their sum, so an example's gradient depends on no other example in the batch."""
    logits = logits.float()
    if labels.dim() == 1:
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)


def private_train_steps(model, params: list[torch.Tensor], make_batch: Callable, batches: list[np.ndarray], *,
                        lr: float, weight_decay: float, precision: Precision, clip: float, noise: float,
                        expected_batch: float, generator: torch.Generator,
                        on_step: Callable[[], None] | None = None) -> float:
    """DP-SGD steps: per-example gradients of every trainable tensor, each clipped to L2 norm `clip`, summed, plus
    N(0, (noise·clip)²), divided by the expected batch size (the Poisson batches vary in size, and may be empty),
    then AdamW (post-processing of the private gradient). bfloat16 autocast is kept (the clipping and the sum are
    float32); float16 with loss scaling is not (GradScaler would skip steps on overflow, a data-dependent choice),
    so such a run trains in float32 under DP. Returns the mean loss over the examples seen, or NaN as soon as a loss
    is not finite."""
    from florana.privacy import clip_per_example, gaussian_noise
    from florana.privacy.per_example import per_example_gradients

    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    autocast = precision.autocast if not precision.scaled else nullcontext
    total, seen = 0.0, 0
    with per_example_gradients(model) as wrapped:
        for idx in batches:
            if len(idx):
                batch = make_batch(idx)
                labels = batch.pop("labels")
                with autocast():
                    logits = wrapped(**batch).logits
                losses = example_losses(logits, labels)
                value = losses.sum().item()
                if not math.isfinite(value):
                    return math.nan
                with warnings.catch_warnings():  # Opacus's hooks on the first LoRA layer, whose input needs no grad
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    losses.sum().backward()
                summed, _ = clip_per_example([p.grad_sample for p in params], clip)
                total, seen = total + value, seen + len(idx)
            else:
                summed = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
            for p, s, z in zip(params, summed, gaussian_noise(params, noise * clip, generator)):
                p.grad = ((s + z) / expected_batch).to(p.dtype)
                p.grad_sample = None
            opt.step()
            opt.zero_grad(set_to_none=True)
            if on_step:
                on_step()
    return total / max(seen, 1)
