"""Every combination of methods × seeds × alphas on identical partitions, then one table and one set of plots."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from florana.config import RunConfig, describe, differences
from florana.errors import FloranaError
from florana.federation.checkpoint import write_text_atomic
from florana.federation.engine import read_metrics, resumed_config, run
from florana.federation.folders import check_compare_folder, remove_run
from florana.report import tables
from florana.report.plots import plot_runs


def run_name(method: str, alpha: float, seed: int) -> str:
    return f"{method}-alpha{alpha:g}-seed{seed}"


def compare(base: RunConfig, methods: list[str], seeds: list[int], alphas: list[float], out: Path,
            progress=None, force: bool = False) -> list[dict]:
    """Runs (or resumes, or reuses when finished) each combination under out/, then writes summary.md,
    summary.csv and plots/alpha<α>/. The partition depends only on (seed, alpha), never on the method. A run
    folder is reused only for an identical config; otherwise an error, or with `force` the old run is removed."""
    out = Path(out)
    check_compare_folder(out)
    plan = [(base.with_overrides(method=method, seed=seed, alpha=alpha), out / run_name(method, alpha, seed))
            for alpha, seed, method in itertools.product(alphas, seeds, methods)]
    for config, run_dir in plan:  # all checked before any run starts
        if (run_dir / "config.toml").exists() and (changes := differences(resumed_config(run_dir), config)):
            if not force:
                raise FloranaError(f"{run_dir}: holds a run of another config ({describe(changes)}); pass --force "
                                   "to redo it, or choose another --out")
            remove_run(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    histories = []
    for config, run_dir in plan:
        resume = (run_dir / "config.toml").exists()
        done = resume and (run_dir / "global_adapter").is_dir() and len(read_metrics(run_dir)) == config.rounds
        if not done:
            run(None if resume else config, run_dir, resume=resume, progress=progress)
        histories.append(read_metrics(run_dir))
    return write_summary(histories, out)


def write_summary(histories: list[list[dict]], out: Path) -> list[dict]:
    rows = tables.summarize(histories)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "summary.md", tables.to_markdown(rows))
    write_text_atomic(out / "summary.csv", tables.to_csv(rows))
    for alpha in sorted({h[-1].get("alpha") for h in histories}, key=str):
        by_method: dict[str, list[list[dict]]] = {}
        for h in histories:
            if h[-1].get("alpha") == alpha:
                by_method.setdefault(h[-1]["method"], []).append(h)
        plot_runs({m: mean_history(hs) for m, hs in by_method.items()}, out / "plots" / f"alpha{alpha}")
    return rows


def mean_history(histories: list[list[dict]]) -> list[dict]:
    """Per round, the mean over seeds of every numeric metric (for one line per method)."""
    rounds = min(len(h) for h in histories)
    out = []
    for i in range(rounds):
        ms = [h[i] for h in histories]
        merged = {"round": ms[0]["round"]}
        for key in ("global_accuracy", "relative_error", "error_floor", "cum_bytes_up", "cum_bytes_down"):
            vals = [m.get(key) for m in ms if m.get(key) is not None]
            merged[key] = float(np.mean(vals)) if vals else None
        out.append(merged)
    return out
