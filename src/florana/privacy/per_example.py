"""Per-example gradients of a model's trainable tensors, by Opacus's GradSampleModule (hooks on the modules that hold
trainable parameters: LoRA's lora_A/lora_B linears and a classification head), attached for one client's training."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def per_example_gradients(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model wrapped so that each backward of a summed loss leaves `p.grad_sample` (batch, *p.shape) on every
    trainable p; the hooks are removed and the per-example gradients dropped on exit. Wrap after choosing what trains
    (the hooks go on the modules whose parameters require gradients then)."""
    from opacus import GradSampleModule

    with warnings.catch_warnings():  # Opacus warns about full backward hooks on modules it does not hook
        warnings.simplefilter("ignore")
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        yield wrapped
    finally:
        wrapped.cleanup()  # hooks off, Opacus's attributes (grad_sample, counters) off the parameters
        for m in model.modules():
            if "activations" in vars(m):  # what a forward without a backward left behind (vars: PEFT wrappers
                # forward attribute lookups to the module they wrap)
                del m.activations
