"""The change some methods make to the frozen base weights (flora's merges, fedex's residuals), kept apart from them.

A base delta maps a module to its accumulated ΔW (d×k, the layout of B @ A), in float32 at least: the model adds
it in its forward pass (train/model.py), because added into bf16 or fp16 base weights most of a small update would
round away. A round's change travels as a payload of tensors under these keys:
- '<module>.B', '<module>.A': factors whose product is added (flora's stacked factors, scaling folded into B);
- '<module>.delta': a dense d×k matrix that is added (fedex's residual);
- '<module>.total': the whole delta, which replaces the receiver's (for a client that missed changes).
Pure functions: the server and every client apply a change with the same code, so they hold the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from florana.lora.adapter import LoraAdapter

ADD_FACTORS, ADD_DENSE, REPLACE = ("B", "A"), "delta", "total"


def factor_change(adapter: LoraAdapter) -> dict[str, Tensor]:
    """A change of scaling·B·A per module, sent as factors (what flora's server sends)."""
    out: dict[str, Tensor] = {}
    for name, m in adapter.modules.items():
        out[f"{name}.B"] = (adapter.scaling(name) * m.B.float()).contiguous()
        out[f"{name}.A"] = m.A.float().contiguous()
    return out


def dense_change(update: dict[str, Tensor]) -> dict[str, Tensor]:
    """A change given as dense d×k matrices (fedex's residual)."""
    return {f"{name}.{ADD_DENSE}": t for name, t in update.items()}


def total_change(delta: dict[str, Tensor]) -> dict[str, Tensor]:
    """The whole delta, for a client to take over in place of its own."""
    return {f"{name}.{REPLACE}": t for name, t in delta.items()}


def apply_change(delta: dict[str, Tensor], change: dict[str, Tensor]) -> dict[str, Tensor]:
    """The delta after `change`, as a new dict (tensors are never modified in place: a change may be shared)."""
    out = {} if any(key.endswith(f".{REPLACE}") for key in change) else dict(delta)
    for key, t in change.items():
        name, kind = key.rsplit(".", 1)
        if kind == ADD_FACTORS[1]:
            continue
        step = t @ change[f"{name}.{ADD_FACTORS[1]}"] if kind == ADD_FACTORS[0] else t
        step = step if step.dtype in (torch.float32, torch.float64) else step.float()
        out[name] = out[name] + step if name in out else step.clone()
    return out
