"""One client's LoRA adapter in memory: its PEFT config, its factors per module, its other trainable tensors."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
EMB_A, EMB_B = ".lora_embedding_A", ".lora_embedding_B"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraModule:
    """Factors of one adapted module: ΔW = scaling · B @ A, A (r, k), B (d, r).

    `embedding` is true where PEFT names the factors lora_embedding_A/B (its base weight stores ΔWᵀ).
    """

    A: Tensor
    B: Tensor
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(d, k) of the product B @ A."""
        return self.B.shape[0], self.A.shape[1]


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter: `config` is adapter_config.json as a dict, `modules` maps each module's path in the
    PEFT model (e.g. 'base_model.model.bert.encoder.layer.0.attention.self.query') to its factors, and `extra`
    holds every other saved tensor (modules_to_save such as a classification head) under its file key."""

    config: dict
    modules: dict[str, LoraModule]
    extra: dict[str, Tensor] = field(default_factory=dict)

    def scaling(self, module: str) -> float:
        return module_scaling(self.config, module, self.modules[module].rank)

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors under the keys PEFT writes to adapter_model.safetensors."""
        out: dict[str, Tensor] = {}
        for name, m in self.modules.items():
            a_key, b_key = (name + EMB_A, name + EMB_B) if m.embedding else (name + LORA_A, name + LORA_B)
            out[a_key], out[b_key] = m.A, m.B
        out.update(self.extra)
        return out


def model_path(module: str) -> str:
    """The module's path inside the base model (what PEFT's rank_pattern keys and base weights are named by)."""
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule for rank_pattern/alpha_pattern: the first key that matches the end of the module's path."""
    path = model_path(module)
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def module_scaling(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of one module: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def alpha_for_scaling(config: dict, scaling: float, rank: int) -> float:
    """The lora_alpha that gives `scaling` at `rank` under the config's scaling rule (inverse of module_scaling)."""
    alpha = scaling * (math.sqrt(rank) if config.get("use_rslora") else rank)
    return float(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 * max(1.0, abs(alpha)) else alpha


def with_ranks(config: dict, ranks: dict[str, int], scalings: dict[str, float]) -> dict:
    """A copy of `config` whose modules have the given ranks and scalings.

    The most common (rank, scaling) becomes `r`/`lora_alpha`; every other module gets an exact-path entry in
    rank_pattern/alpha_pattern, so that PEFT rebuilds each module exactly as given.
    """
    combos: dict[tuple[int, float], int] = {}
    for name, r in ranks.items():
        combos[(r, scalings[name])] = combos.get((r, scalings[name]), 0) + 1
    (r0, s0), _ = max(combos.items(), key=lambda kv: kv[1])
    out = dict(config)
    out["r"], out["lora_alpha"] = r0, alpha_for_scaling(config, s0, r0)
    out["rank_pattern"], out["alpha_pattern"] = {}, {}
    for name, r in ranks.items():
        if (r, scalings[name]) != (r0, s0):
            key = re.escape(model_path(name))
            out["rank_pattern"][key] = r
            out["alpha_pattern"][key] = alpha_for_scaling(config, scalings[name], r)
    return out


def at_rank(tensors: dict[str, Tensor], rank: int, b_factor: float = 1.0) -> dict[str, Tensor]:
    """An adapter's tensors (under PEFT's file keys) cut to their first `rank` components: the rows of lora_A, the
    columns of lora_B, which is also multiplied by `b_factor`; every other tensor as it is."""
    out = {}
    for key, t in tensors.items():
        if key.endswith(LORA_A):
            t = t[:rank].clone()
        elif key.endswith(LORA_B):
            t = t[:, :rank].clone(memory_format=torch.contiguous_format)
            if b_factor != 1.0:
                t = t * b_factor
        out[key] = t
    return out


def padded_to_rank(tensors: dict[str, Tensor], rank: int, b_factor: float = 1.0) -> dict[str, Tensor]:
    """The inverse of at_rank: an adapter's tensors zero-padded to `rank` components (rows of lora_A, columns of
    lora_B, which is also multiplied by `b_factor`); every other tensor as it is. HetLoRA's padding: what a client of
    a smaller rank adds to a sum taken at the global rank."""
    out = {}
    for key, t in tensors.items():
        if key.endswith(LORA_A):
            t = torch.cat([t, t.new_zeros(rank - t.shape[0], t.shape[1])])
        elif key.endswith(LORA_B):
            t = torch.cat([t * b_factor if b_factor != 1.0 else t, t.new_zeros(t.shape[0], rank - t.shape[1])], dim=1)
        out[key] = t
    return out


def revive_dead_slots(tensors: dict[str, Tensor], seed: int) -> None:
    """Give every dead slot of an adapter's tensors (PEFT's file keys; an A row and B column both zero: neither gets a
    gradient, so it would never train) a fresh A row, drawn as PEFT draws A (kaiming-uniform, bound 1/√k), replacing
    the dict's entry (the tensors themselves are not modified); the product B·A, and so the model, is unchanged.
    Dead slots come from aggregates that have no component there: zero-padding when no client of that rank took
    part (fedit, hetlora, florana), an SVD past the aggregate's rank (svd, flexlora)."""
    g = None
    for key in sorted(k for k in tensors if k.endswith(LORA_A)):
        A, B = tensors[key], tensors[key[: -len(LORA_A)] + LORA_B]
        dead = (A == 0).all(dim=1) & (B == 0).all(dim=0)
        if bool(dead.any()):
            g = g or torch.Generator().manual_seed(seed)
            bound = 1.0 / math.sqrt(A.shape[1])
            fresh = torch.empty(int(dead.sum()), A.shape[1], dtype=A.dtype).uniform_(-bound, bound, generator=g)
            A = A.clone()
            A[dead] = fresh
            tensors[key] = A


def base_layout(delta: Tensor, module: LoraModule, config: dict) -> Tensor:
    """ΔW (d, k) in the layout of the base weight it updates: transposed for embeddings and fan_in_fan_out."""
    return delta.mT if module.embedding or config.get("fan_in_fan_out") else delta


def has_non_finite(t: Tensor) -> bool:
    return not bool(torch.isfinite(t).all())
