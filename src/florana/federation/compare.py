"""Every combination of methods × seeds × alphas on identical partitions, then one table and one set of plots."""

from __future__ import annotations

import itertools
from pathlib import Path

from florana.config import RunConfig, describe, differences
from florana.errors import FloranaError
from florana.federation.engine import read_metrics, resumed_config, run
from florana.federation.folders import check_compare_folder, remove_run
from florana.report.summary import load_run, write_summary
from florana.report.tables import BASELINE, TARGET


def run_name(method: str, alpha: float, seed: int) -> str:
    return f"{method}-alpha{alpha:g}-seed{seed}"


def compare(base: RunConfig, methods: list[str], seeds: list[int], alphas: list[float], out: Path,
            progress=None, force: bool = False, target: float = TARGET, baseline: str = BASELINE) -> list[dict]:
    """Runs (or resumes, or reuses when finished) each combination under out/, then writes the summary
    (report.summary: tables with intervals over seeds, paired differences against `baseline`, the cost of reaching
    `target`, plots/alpha<α>/, provenance). The partition depends only on (seed, alpha), never on the method. A run
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
    runs = []
    for config, run_dir in plan:
        resume = (run_dir / "config.toml").exists()
        done = resume and (run_dir / "global_adapter").is_dir() and len(read_metrics(run_dir)) == config.rounds
        if not done:
            run(None if resume else config, run_dir, resume=resume, progress=progress)
        runs.append(load_run(run_dir))
    return write_summary([r for r in runs if r is not None], out, target, baseline)
