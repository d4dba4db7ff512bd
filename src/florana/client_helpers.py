"""What a client does with the global adapter, for the methods whose clients do more than load it.

- fedit, florana, svd, lora_fair, hetlora, flexlora: load it (a client of a smaller rank its first r components:
  `client_part(..., rank=r)`).
- ffa, fedsvd: load it; train B only (A stays the shared frozen A the server checks; fedsvd's server refreshes it).
- rolora: load it; train B in odd rounds (A frozen), A in even rounds (B frozen).
- fedsa: load A (and other tensors) only and keep its own B: `client_part(global, "fedsa")`.
- flora: add `report.base_update` to the base weights (`apply_base_update`) and restart LoRA from a fresh init.
- fedex: load it and add `report.base_update` (the residual) to the base weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from florana.aggregation.registry import get_method
from florana.errors import FloranaError
from florana.lora.adapter import EMB_A, EMB_B, LORA_A, LORA_B, at_rank, model_path


def client_part(global_state: Mapping[str, Tensor], method: str = "florana", *, round: int = 1,
                rank: int | None = None, scaling_ratio: float = 1.0) -> dict[str, Tensor]:
    """The part of a global adapter (PEFT keys) a client of `method` loads into its model in round `round`: the
    factors the method sends down (fedsa: not B, which each client keeps; flora: neither, clients restart LoRA;
    rolora: those the round sends) and every other tensor. rank: cut the factors to their first `rank` components,
    for a client of a smaller rank than the global one; scaling_ratio: the global scaling over the client's
    (lora_alpha/r differs between ranks), which multiplies B so that the client's product is the global one's."""
    m = get_method(method).at_round(round)
    out = {}
    for key, t in global_state.items():
        factor = "A" if key.endswith((LORA_A, EMB_A)) else "B" if key.endswith((LORA_B, EMB_B)) else None
        if factor is None or m.sends(factor, up=False):
            out[key] = t
    return out if rank is None else at_rank(out, rank, scaling_ratio)


@torch.no_grad()
def apply_base_update(model: torch.nn.Module, base_update: Mapping[str, Tensor]) -> None:
    """Add each module's dense update (`AggregateReport.base_update`: d×k like B @ A, keyed by the module's name in
    the PeftModel) to that module's frozen base weight, in place: transposed where the base weight stores ΔWᵀ
    (embeddings, fan_in_fan_out), added in float32 and rounded once to the weight's dtype (a small update to
    bfloat16 or float16 weights mostly rounds away: keep such a base in float32). `model` is the PeftModel, or the
    base model the names lose their 'base_model.model.' prefix in."""
    for name, delta in base_update.items():
        layer = _submodule(model, name)
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        weight = getattr(base, "weight", None)
        if weight is None:
            raise FloranaError(f"module {name}: has no base weight to update")
        transposed = isinstance(base, torch.nn.Embedding) or getattr(layer, "fan_in_fan_out", False)
        step = delta.mT if transposed else delta
        if tuple(step.shape) != tuple(weight.shape):
            raise FloranaError(f"module {name}: update of shape {tuple(delta.shape)} does not fit its base weight "
                               f"{tuple(weight.shape)}")
        work = torch.promote_types(weight.dtype, torch.float32)
        weight.copy_((weight.to(work) + step.to(weight.device, work)).to(weight.dtype))


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    for path in (name, model_path(name)):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise FloranaError(f"module {name}: not in the model (is it the PeftModel the adapter belongs to?)")
