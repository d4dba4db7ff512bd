"""`florana.aggregate`: florana's aggregators for code that already holds client adapters in memory.

A thin layer over aggregation/ and lora/: clients given as PEFT state dicts, `PeftModel`s or adapter folders become
`LoraAdapter`s, `aggregate_adapters` does the work (the same call as `florana aggregate` and the Flower strategies),
and the global adapter comes back in PEFT's key format with a typed report.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from florana.aggregation.adapters import Report, aggregate_adapters
from florana.aggregation.base import Method
from florana.aggregation.registry import get_method
from florana.errors import FloranaError
from florana.lora.adapter import LoraAdapter
from florana.lora.base_delta import apply_change, factor_change
from florana.lora.peft_io import adapter_from_state_dict, config_problem, load_adapter

Client = Mapping[str, Tensor] | str | os.PathLike | Any  # a PEFT state dict, an adapter folder or a PeftModel


@dataclass
class AggregateReport(Report):
    """The aggregation report (errors relative to ‖ΔW*‖_F, error floor, FedIT's error, bytes per client, per-module
    details; see aggregation.Report), with what a caller needs to use the global adapter.

    lora_config: the global adapter's adapter_config (its rank where that differs from the clients': flora's Σ r_u,
    a larger global rank; rank_pattern/alpha_pattern where modules differ). base_update: the dense change each
    module's frozen base weight receives, keyed by module (as in the state dict, without .lora_A.weight), d×k like
    B @ A, float32 at least: fedex's residual, flora's merged stack (whose clients restart LoRA each round); empty
    for every other method. Apply it with `florana.client_helpers.apply_base_update`.
    """

    lora_config: dict = field(default_factory=dict)
    base_update: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        out = super().to_json()
        out.pop("base_update")
        out["base_update_modules"] = sorted(self.base_update)
        return out


def aggregate(clients: Sequence[Client], method: str = "florana", lora_config=None,
              weights: Sequence[float] | Tensor | None = None, *, rank: int | None = None, round: int = 1,
              labels: Sequence[str] | None = None,
              options: Mapping[str, Any] | None = None) -> tuple[dict[str, Tensor], AggregateReport]:
    """Aggregate client LoRA adapters into one global adapter with `method` (florana, svd, fedit, ...).

    clients: PEFT state dicts (what `get_peft_model_state_dict` returns: `...lora_A.weight`/`...lora_B.weight` and
    any other trainable tensors, e.g. `modules_to_save` heads, which are averaged with the client weights),
    `PeftModel`s (their active adapter) or adapter folders, mixed freely. lora_config: the `peft.LoraConfig` (or
    adapter_config dict) of the state-dict clients, which sets each module's LoRA scaling; one for all or one per
    client; models and folders carry their own. weights: one per client (e.g. example counts), normalised; uniform
    when None. rank: the global rank where a method pads (default the largest client rank). round: the round these
    adapters close, for methods whose protocol alternates (rolora trains B in odd rounds, A in even; fedsvd
    re-factors). labels: the clients' names in error messages (default 'client 0', 'client 1', ...). options: the
    method's own (lora_fair: lam, steps, lr; fedsvd: period, its re-factoring interval in rounds; florana: solver,
    steps, lr, prox, gauge; svd: split).

    Returns the global adapter as a state dict in PEFT's keys (what `set_peft_model_state_dict` takes), in the
    clients' dtype and on their device (the arithmetic runs there too, its small matrices in float64 where the device
    has it), and the report.
    Clients of different ranks are aggregated by the methods that accept them; a client of rank r_u takes the first
    r_u components (`florana.client_helpers.client_part`). Clients that cannot be aggregated (a lora_A without its
    lora_B, shapes or key sets that differ, NaN or Inf, a frozen factor that differs for ffa/rolora/fedsvd) raise
    FloranaError naming the client and the module. Methods that change the client's protocol: see
    `florana.client_helpers` (fedsa's clients keep their own B; flora and fedex change the base weights).
    """
    if isinstance(clients, (Mapping, str, os.PathLike)) or not isinstance(clients, Sequence):
        raise FloranaError("clients must be a list of PEFT state dicts, PeftModels or adapter folders")
    labels = list(labels) if labels is not None else [f"client {u}" for u in range(len(clients))]
    if len(labels) != len(clients):
        raise FloranaError(f"got {len(labels)} labels for {len(clients)} clients")
    configs = _per_client(lora_config, len(clients))
    adapters = [_adapter(c, cfg, label) for c, cfg, label in zip(clients, configs, labels)]
    return _aggregate(adapters, get_method(method).configured(**(options or {})), weights, labels, rank=rank,
                      round_=round)


def _aggregate(adapters: Sequence[LoraAdapter], method: Method, weights, labels: Sequence[str], *,
               rank: int | None = None, round_: int = 1) -> tuple[dict[str, Tensor], AggregateReport]:
    """The one code path of `aggregate` and the Flower strategy: aggregate on the clients' device (a GPU's
    aggregation of 7B-shape adapters takes a fraction of the CPU's time), answer there."""
    if not adapters:
        raise FloranaError("aggregation needs at least one client")
    device = _device(adapters, labels)
    result = aggregate_adapters(adapters, method, weights, labels=labels, rank=rank, round_=round_, device=device)
    base_update = result.base_update
    if method.merges:  # flora: the stacked product is the base change; clients restart LoRA
        base_update = apply_change({}, factor_change(result.adapter))
    report = AggregateReport(**result.report.__dict__, lora_config=dict(result.adapter.config),
                             base_update={k: v.to(device) for k, v in base_update.items()})
    return {k: v.to(device) for k, v in result.adapter.state_dict().items()}, report


def _per_client(lora_config, n: int) -> list:
    if isinstance(lora_config, Sequence) and not isinstance(lora_config, (str, Mapping)):
        if len(lora_config) != n:
            raise FloranaError(f"got {len(lora_config)} lora_configs for {n} clients; give one, or one per client")
        return list(lora_config)
    return [lora_config] * n


def _config_dict(lora_config, label: str) -> dict:
    """A peft.LoraConfig or adapter_config dict as the JSON-like dict adapter_config.json holds, checked."""
    if hasattr(lora_config, "to_dict"):
        lora_config = lora_config.to_dict()
    if not isinstance(lora_config, Mapping):
        raise FloranaError(f"{label}: lora_config must be a peft.LoraConfig or a dict, got "
                           f"{type(lora_config).__name__}")
    config = json.loads(json.dumps(dict(lora_config), default=_jsonable))
    problem = config_problem(config)
    if problem:
        raise FloranaError(f"{label}: lora_config: {problem}")
    return config


def _jsonable(x):
    """What LoraConfig.to_dict holds beyond JSON: enums (peft_type, task_type) and sets (target_modules)."""
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    return str(x)


def _adapter(client, lora_config, label: str) -> LoraAdapter:
    """One client as a LoraAdapter: a state dict with lora_config, a PeftModel's active adapter, or a folder."""
    if isinstance(client, (str, os.PathLike)):
        return load_adapter(Path(client))
    if hasattr(client, "peft_config") and hasattr(client, "active_adapter"):
        from peft import get_peft_model_state_dict

        name = client.active_adapter
        config = _config_dict(client.peft_config[name], label)
        return _adapter_of(config, get_peft_model_state_dict(client, adapter_name=name), label)
    if isinstance(client, Mapping):
        if lora_config is None:
            raise FloranaError(f"{label} is a state dict: pass lora_config (the peft.LoraConfig the clients trained "
                               "with), which sets the LoRA scaling")
        return _adapter_of(_config_dict(lora_config, label), client, label)
    raise FloranaError(f"{label}: expected a PEFT state dict, a PeftModel or an adapter folder, got "
                       f"{type(client).__name__}")


def _adapter_of(config: dict, state_dict: Mapping[str, Tensor], label: str) -> LoraAdapter:
    bad = [k for k, t in state_dict.items() if not isinstance(t, Tensor)]
    if bad:
        raise FloranaError(f"{label}: {bad[0]} is a {type(state_dict[bad[0]]).__name__}, not a tensor")
    return adapter_from_state_dict(config, {k: t.detach() for k, t in state_dict.items()}, source=label)


def _device(adapters: Sequence[LoraAdapter], labels: Sequence[str]) -> torch.device:
    """The one device every client's tensors are on."""
    found = {label: {t.device for t in a.state_dict().values()} for a, label in zip(adapters, labels)}
    devices = set().union(*found.values())
    if len(devices) > 1:
        where = ", ".join(f"{label}: {', '.join(sorted(map(str, d)))}" for label, d in found.items())
        raise FloranaError(f"the clients' tensors are on different devices ({where}); move them to one")
    return devices.pop()

