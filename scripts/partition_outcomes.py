"""Each partition of a sweep beside how a method fared on it against a baseline (issue 14: on seed 2 of the default,
FLoRA-NA's global model collapsed where two large clients held almost only one class; does that kind of partition
predict the failure on other seeds, α and tasks?).

One row per (α, seed) where both finished: the partition's shape under example weights (how much
weight sits on one-sided clients, those whose largest class is at least `--one-sided` of their examples; the most
of it that agrees on one class; the weight of the largest mixed client) and the outcome (final global accuracy of
each, the difference, the method's final macro-F1 and logit spread where recorded).

    PYTHONPATH=src .venv/bin/python scripts/partition_outcomes.py COMPARE_FOLDER [--method florana] [--baseline fedit]
        [--set florana_prox=0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from florana.errors import FloranaError
from florana.federation.compare import parse_settings, run_name


def shape(stats: list[dict], one_sided: float = 0.9) -> dict:
    """A partition's shape from partition.json's per-client sizes and label counts, each client weighted by its
    share of the partitioned examples (near its example weight, which counts only its training part): the weight
    of the one-sided clients (largest class ≥ `one_sided` of its examples), the most of that weight on one class,
    and the weight of the largest client that is not one-sided."""
    total = sum(c["size"] for c in stats)
    if total == 0:
        raise FloranaError("partition.json: no client has examples")
    sided: dict[str, float] = {}
    mixed = 0.0
    for c in stats:
        w = c["size"] / total
        top, count = max(c["labels"].items(), key=lambda kv: kv[1]) if c["labels"] else ("", 0)
        if c["size"] and count >= one_sided * c["size"]:
            sided[top] = sided.get(top, 0.0) + w
        else:
            mixed = max(mixed, w)
    return {"one_sided_w": sum(sided.values()), "agreeing_w": max(sided.values(), default=0.0),
            "agreeing_class": max(sided, key=sided.get) if sided else "", "largest_mixed_w": mixed}


def final(run_dir: Path) -> dict | None:
    """A finished run's last metrics line (None while the run has not written its global adapter)."""
    if not (run_dir / "global_adapter").is_dir():
        return None
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])


def partition(run_dir: Path) -> list[dict]:
    """A run's partition.json: each client's size and label counts."""
    path = run_dir / "partition.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FloranaError(f"{path}: cannot read the partition ({e})") from None


def rows(folder: Path, method: str, baseline: str, extra: dict | None = None, one_sided: float = 0.9) -> list[dict]:
    """The finished pairs in a compare folder: `method`'s runs with the options `extra` (compare's run names say
    them) beside `baseline`'s plain run of the same α and seed, by α and seed."""
    out = []
    for run_dir in sorted(p.parent for p in folder.glob("*/metrics.jsonl")):
        last = final(run_dir)
        if last is None or run_dir.name != run_name(method, last["alpha"], last["seed"], extra):
            continue
        base_dir = folder / run_name(baseline, last["alpha"], last["seed"])
        base = final(base_dir)
        if base is None:
            continue
        stats = partition(run_dir)
        if partition(base_dir) != stats:
            raise FloranaError(f"{run_dir} and {base_dir}: different partitions, not a pair")
        acc = last.get("final_global_accuracy", last.get("global_accuracy"))
        base_acc = base.get("final_global_accuracy", base.get("global_accuracy"))
        out.append({"alpha": last["alpha"], "seed": last["seed"], **shape(stats, one_sided), "accuracy": acc,
                    "baseline_accuracy": base_acc, "difference": acc - base_acc,
                    "macro_f1": last.get("global_macro_f1"), "logit_spread": last.get("global_logit_spread")})
    return sorted(out, key=lambda r: (r["alpha"], r["seed"]))


def markdown(table: list[dict], method: str, baseline: str) -> str:
    def num(v):
        return "–" if v is None else f"{v:.3f}"
    head = ["α", "seed", "one-sided w", "agreeing w (class)", "largest mixed w", f"{method} acc",
            f"{baseline} acc", "difference", f"{method} macro-F1", f"{method} logit spread"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        lines.append("| " + " | ".join([f"{r['alpha']:g}", str(r["seed"]), num(r["one_sided_w"]),
                                        f"{num(r['agreeing_w'])} ({r['agreeing_class'] or '–'})",
                                        num(r["largest_mixed_w"]), num(r["accuracy"]), num(r["baseline_accuracy"]),
                                        f"{r['difference']:+.3f}", num(r["macro_f1"]), num(r["logit_spread"])]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a compare --out folder")
    ap.add_argument("--method", default="florana")
    ap.add_argument("--baseline", default="fedit")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="the method's runs with this option (compare --set), e.g. florana_prox=0")
    ap.add_argument("--one-sided", type=float, default=0.9, help="a client's largest class share to count as one-sided")
    args = ap.parse_args()
    try:
        table = rows(args.folder, args.method, args.baseline, parse_settings(args.set), args.one_sided)
    except FloranaError as e:
        raise SystemExit(f"error: {e}") from None
    if not table:
        raise SystemExit(f"error: {args.folder}: no finished pair of {args.method} and {args.baseline} runs")
    print(markdown(table, args.method, args.baseline))


if __name__ == "__main__":
    main()
