"""What one round's aggregate does to a classifier's global model, method by method, on the same client updates:
load a run's state after round K−1 (a checkpoint it kept), let round K's sampled clients train exactly as the run's
did, aggregate those updates with each method given and score each resulting global model on the whole test set
(accuracy, logit margins, the spread of the encoder's [CLS] output) with its aggregation error against ΔW*. Issue 14:
on seed 2 FLoRA-NA's [CLS] spread collapsed in round 7; would FedIT's aggregate of the same updates have kept it?

    PYTHONPATH=src .venv/bin/python scripts/aggregate_probe.py RUN_DIR ROUND [METHOD[,KEY=VALUE...] ...]

Default methods: the run's own, fedit, florana, svd and fedex (FedIT's factors plus the rest of ΔW* in the base
weights: the exact update). A method must train what the run's clients trained (both factors, none kept personal,
no restart of LoRA each round), or its aggregate of these updates means nothing.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from global_features import features
from florana.aggregation.base import client_weights
from florana.config import load_config
from florana.errors import FloranaError
from florana.federation.checkpoint import checkpoint_at
from florana.federation.compare import parse_settings
from florana.federation.engine import Federation
from florana.federation.methods import method_of

DEFAULT = ["fedit", "florana", "svd", "fedex"]


def federation(run: Path) -> Federation:
    """The run's Federation (its model, data and method), as the round it replays needs."""
    cfg = load_config(run / "config.toml")
    if cfg.task != "classification":
        raise FloranaError(f"{run}: a {cfg.task} run; this scores a classifier")
    fed = Federation(cfg.with_overrides(threads=torch.get_num_threads()))
    if fed.method is None:
        raise FloranaError(f"{run}: a {cfg.method} run has no aggregate to vary")
    return fed


def module_kind(key: str) -> str:
    """The kind of a LoRA tensor's module: the last part of its name (query, value, ...)."""
    return key.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1]


def products(tensors: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """B·A of every LoRA module of one kind (query, value, ...: the last part of its name), flattened end to end."""
    keys = sorted(k for k in tensors if ".lora_A." in k and module_kind(k) == kind)
    if not keys:
        raise FloranaError(f"no LoRA module of kind {kind!r}")
    return torch.cat([(tensors[k.replace(".lora_A.", ".lora_B.")].double() @ tensors[k].double()).flatten()
                      for k in keys])


def followed(began: dict, updates: list[dict], aggregate: dict, kind: str) -> tuple[list[float], float]:
    """How much of each client's update an aggregate carries in the modules of `kind`: the least-squares coefficients
    β of the aggregate's change of B·A on the clients' changes (ΔW* is Σ_u w_u·change_u, so the exact update has
    β = w), and the part of the aggregate's change they leave out, relative to it (cross terms B_u·A_v, say)."""
    base = products(began, kind)
    changes = torch.stack([products({**began, **u}, kind) - base for u in updates])
    target = products(aggregate, kind) - base
    beta = torch.linalg.lstsq(changes.T, target.unsqueeze(1)).solution.squeeze(1)
    return beta.tolist(), float((target - changes.T @ beta).norm() / target.norm())


def probe(run: Path, round_: int, candidates: list[str], clients: bool = False,
          start: dict[str, torch.Tensor] | None = None, fed: Federation | None = None,
          follow: list[str] = ()) -> list[dict]:
    """One row per candidate ("method" or "method,key=value,..."): the round's metrics under its aggregate and the
    global model's features; the run's own method first. `clients`: first a row for the global model the round
    started from ("before") and one for each client's trained model ("client u"), features only. `start`: global
    tensors the round starts from in place of the run's (scripts/swap_probe.py). `fed`: federation(run), from an
    earlier call, for a round after the first (whose start is the checkpoint of the round before). `follow`: module
    kinds (query, value, ...) in which to say how much of each client's update each aggregate carries (followed;
    clients of one rank, aggregates that leave the base weights alone)."""
    if fed is not None and round_ == 1:
        raise FloranaError("a Federation used before cannot replay round 1: its initial state is gone")
    fed = fed or federation(run)
    cfg = fed.config
    fed.method = method_of(cfg)  # what the run's clients train (the last call left its last candidate)
    if round_ > 1:
        fed.load_state(*checkpoint_at(run, round_ - 1))
    if start is not None:
        fed.global_tensors = dict(start)
    if follow and len(set(fed.ranks)) > 1:
        raise FloranaError(f"{run}: its clients' ranks differ; following their updates needs one rank")
    before = (fed.state_tensors(), copy.deepcopy(fed.state_meta()))
    began = dict(fed.global_tensors)
    own = fed.method.at_round(round_)
    metrics, results, t0 = fed.train_round(round_)
    rows = []
    if clients:
        fed.load_state(*before)
        rows.append({**features(fed), "method": "before"})
        for u, res in sorted(results.items()):
            fed.global_tensors = {**fed.for_client(began, u), **res.tensors}
            rows.append({**features(fed), "method": f"client {u}", "own_accuracy": res.local_accuracy,
                         "size": res.size})
    for spec in dict.fromkeys([cfg.method, *candidates]):
        name, *settings = spec.split(",")
        method = method_of(cfg.with_overrides(method=name, **parse_settings(settings)))
        if method is None:
            raise FloranaError(f"{spec}: a bound, not an aggregator")
        at = method.at_round(round_)
        if (at.trains_A, at.trains_B) != (own.trains_A, own.trains_B) or at.personal_B or at.merges:
            raise FloranaError(f"{spec}: its clients train differently from {cfg.method}'s in round {round_}; its "
                               f"aggregate of these updates would not be its round")
        fed.load_state(*before)
        fed.method = method
        scores = fed.close_round(copy.deepcopy(metrics), results, t0)
        rows.append({**scores, **features(fed), "method": spec})
        if follow and not method.changes_base:  # fedex's and flora's change is partly in the base weights
            updates = [results[u].tensors for u in sorted(results)]
            sizes = [results[u].size for u in sorted(results)]
            rows[-1]["weights"] = client_weights(sizes if cfg.weighting == "examples" else None, len(sizes)).tolist()
            rows[-1]["follows"] = {kind: followed(began, updates, fed.global_tensors, kind) for kind in follow}
    return rows


def line(row: dict) -> str:
    by_class = ", ".join(f"{m:+.2f}" for m in row["margin_by_class"])
    text = (f"{row['method']:<28} acc {row['accuracy']:.3f}  [CLS] spread {row['cls_spread']:.4f}  "
            f"margin {row['margin_mean']:+.2f} ± {row['margin_std']:.2f} [{by_class}]")
    if "relative_error" in row:
        text += f"  error {row['relative_error']:.4f} (FedIT's {row['fedit_error']:.4f})"
    if row.get("own_accuracy") is not None:
        text += f"  its own held-out {row['own_accuracy']:.3f}"
    for kind, (beta, left) in row.get("follows", {}).items():
        text += f"\n    {kind}: carries of each client's update " + " ".join(f"{b:+.2f}" for b in beta) + \
            f" (left out {left:.2f})"
    return text


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("round", type=int)
    p.add_argument("methods", nargs="*", default=DEFAULT)
    p.add_argument("--clients", action="store_true", help="also the model the round started from and each client's")
    p.add_argument("--follow", default="", help="module kinds, e.g. query,value: how much of each client's update "
                                                "each aggregate carries there")
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        rows = probe(args.run, args.round, args.methods, args.clients, follow=[k for k in args.follow.split(",") if k])
    except FloranaError as e:
        raise SystemExit(f"error: {e}")
    print(f"{args.run.name}, round {args.round}, every aggregate of the same client updates (whole test set):")
    if args.follow:
        weighed = next(r for r in rows if "weights" in r)
        print(f"clients {weighed['clients']}, their weights w: " + " ".join(f"{w:.2f}" for w in weighed["weights"]))
    print("\n".join(line(r) for r in rows))
