"""Which part of a run's state makes its next round go wrong: start round K of run B from B's state after round K−1
with one part of it taken from run A's state after the same round (two methods' runs of one seed: the same
partition, the same clients), let the clients train as B's did and score each client's model and two aggregates of
their updates (B's method's and FedIT's) by the spread of the encoder's [CLS] output. Issue 14: on seed 2 every
aggregate of round 7's updates collapsed FLoRA-NA's representation and none collapsed FedIT's.

    PYTHONPATH=src .venv/bin/python scripts/swap_probe.py RUN_A RUN_B ROUND [VARIANT ...]

VARIANT (default: all): A, B, "B LoRA + A head", "A LoRA + B head", "B at A's ‖A‖" (each module's A scaled to A's
norm, B inversely: the same product, another split), "B at A's ‖BA‖" (each module's B scaled: A's product norm),
"A at B's ‖A‖", "B LoRA in layers ≤ h" / "B LoRA in layers > h" (h: the middle layer; A's LoRA elsewhere) and
"B LoRA in KIND" for each target module kind (query, value, ...).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch

from aggregate_probe import federation, module_kind, probe
from florana.errors import FloranaError
from florana.federation.checkpoint import checkpoint_at

LAYER = re.compile(r"\.layers?\.(\d+)\.")


def global_state(run: Path, round_: int) -> dict[str, torch.Tensor]:
    tensors, _ = checkpoint_at(run, round_)
    return {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("global::")}


def rescaled(g: dict, ref: dict, *, product: bool = False) -> dict:
    """g with each module's A scaled to ref's ‖A‖_F and its B inversely (the same product); with `product`, its B
    scaled so that ‖BA‖_F is ref's."""
    out = dict(g)
    for a in (k for k in g if ".lora_A." in k):
        b = a.replace(".lora_A.", ".lora_B.")
        if product:
            c = (ref[b].double() @ ref[a].double()).norm() / (g[b].double() @ g[a].double()).norm()
            out[b] = (g[b].double() * c).to(g[b].dtype)
        else:
            c = ref[a].double().norm() / g[a].double().norm()
            out[a], out[b] = (g[a].double() * c).to(g[a].dtype), (g[b].double() / c).to(g[b].dtype)
    return out


def variants(A: dict, B: dict) -> dict[str, dict]:
    """The hybrid start states by name."""
    lora = lambda k: ".lora_" in k  # noqa: E731
    mix = lambda take: {k: B[k] if take(k) else A[k] for k in A}  # noqa: E731 (B's where take says, else A's)
    layers = sorted({int(m.group(1)) for k in A if lora(k) and (m := LAYER.search(k))})
    kinds = sorted({module_kind(k) for k in A if lora(k)})
    out = {"A": A, "B": B, "B LoRA + A head": mix(lora), "A LoRA + B head": mix(lambda k: not lora(k)),
           "B at A's ‖A‖": rescaled(B, A), "B at A's ‖BA‖": rescaled(B, A, product=True),
           "A at B's ‖A‖": rescaled(A, B)}
    if layers:
        h = layers[len(layers) // 2 - 1]
        layer = lambda k: int(LAYER.search(k).group(1))  # noqa: E731
        out[f"B LoRA in layers ≤ {h}"] = mix(lambda k: lora(k) and layer(k) <= h)
        out[f"B LoRA in layers > {h}"] = mix(lambda k: lora(k) and layer(k) > h)
    for kind in kinds:
        out[f"B LoRA in {kind}"] = mix(lambda k, kind=kind: lora(k) and module_kind(k) == kind)
    return out


def swap(run_a: Path, run_b: Path, round_: int, names: list[str] | None = None) -> list[dict]:
    """For each variant: the [CLS] spread it starts round `round_` with, each client's after training from it (and
    their mean weighted by examples), and that of B's method's aggregate and FedIT's."""
    if (run_a / "partition.json").read_text() != (run_b / "partition.json").read_text():
        raise FloranaError(f"{run_a} and {run_b} partition the data differently: their clients are not the same")
    starts = variants(global_state(run_a, round_ - 1), global_state(run_b, round_ - 1))
    unknown = sorted(set(names or []) - set(starts))
    if unknown:
        raise FloranaError(f"unknown variant {unknown[0]!r}; variants: {', '.join(starts)}")
    rows, fed = [], federation(run_b)
    for name in names or starts:
        before, *clients, own, fedit = probe(run_b, round_, ["fedit"], clients=True, start=starts[name], fed=fed)
        sizes, spreads = np.array([c["size"] for c in clients], float), np.array([c["cls_spread"] for c in clients])
        rows.append({"variant": name, "start": before["cls_spread"], "clients": spreads.tolist(),
                     "clients_mean": float(spreads @ sizes / sizes.sum()), "own": own["method"],
                     "own_spread": own["cls_spread"], "fedit_spread": fedit["cls_spread"],
                     "fedit_accuracy": fedit["accuracy"]})
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("round", type=int)
    p.add_argument("variants", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        for r in swap(args.run_a, args.run_b, args.round, args.variants):
            print(f"{r['variant']:<24} starts at [CLS] spread {r['start']:.4f}; clients' models "
                  f"{' '.join(f'{s:.3f}' for s in r['clients'])} (mean by examples {r['clients_mean']:.3f}); "
                  f"{r['own']}'s aggregate {r['own_spread']:.4f}, FedIT's {r['fedit_spread']:.4f} "
                  f"(acc {r['fedit_accuracy']:.3f})", flush=True)
    except FloranaError as e:
        raise SystemExit(f"error: {e}")
