"""Every combination of methods × seeds × alphas (× the values of any other config keys) on identical partitions,
then one summary."""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

from florana.config import FIELDS, RunConfig, config_from_dict, describe
from florana.errors import FloranaError
from florana.federation.engine import read_metrics, resumed_config, run
from florana.federation.folders import RunInUse, check_compare_folder, remove_run
from florana.report.summary import find_runs, finished, load_run, write_summary
from florana.federation.methods import method_owning, run_differences
from florana.report.tables import BASELINE, TARGET, Run

AXES = {"method": "--methods", "seed": "--seeds", "alpha": "--alpha"}  # the grid's own flags
log = logging.getLogger("florana")


def _name_part(v) -> str:
    text = f"{v:g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)
    return re.sub(r"[^A-Za-z0-9._]", "_", text)


def run_name(method: str, alpha: float, seed: int, extra: dict | None = None) -> str:
    """'fedit-alpha0.5-seed0'; with grid keys, 'fedit-alpha0.5-local_steps5-seed0'."""
    keys = "".join(f"-{k}{_name_part(v)}" for k, v in (extra or {}).items())
    return f"{method}-alpha{alpha:g}{keys}-seed{seed}"


def _key_and_text(item: str, takes: str) -> tuple[str, str, str]:
    """'key=text' → (key, its type in RunConfig, text), the key known; `takes` shows the form in errors."""
    key, sep, text = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not text.strip():
        raise FloranaError(f"--set takes {takes}, got {item!r}")
    if key not in FIELDS:
        raise FloranaError(f"--set {key}: unknown key; known keys: {', '.join(FIELDS)}")
    return key, FIELDS[key].type, text.strip()


def parse_grid(items: list[str]) -> dict[str, list]:
    """`--set key=v1,v2,...` (repeatable) as {key: [values]}, each value read as the key's type in RunConfig (its
    range is checked when the run's config is made)."""
    grid: dict[str, list] = {}
    for item in items:
        key, kind, values = _key_and_text(item, "key=v1,v2,...")
        if key in AXES:
            raise FloranaError(f"--set {key}: use {AXES[key]} for it")
        if key in grid:
            raise FloranaError(f"--set {key} is given twice; list all its values in one --set {key}=v1,v2")
        if kind.startswith("list"):
            raise FloranaError(f"--set {key}: a list key cannot be a grid axis (set it in --config)")
        grid[key] = [_typed(key, kind, v.strip()) for v in values.split(",") if v.strip()]
    return grid


def parse_settings(items: list[str]) -> dict:
    """`florana run --set key=value` (repeatable) as {key: value}, read as the key's type in RunConfig; a list key
    takes comma-separated items (--set target_modules=query,key,value)."""
    settings: dict = {}
    for item in items:
        key, kind, text = _key_and_text(item, "key=value")
        if key in settings:
            raise FloranaError(f"--set {key} is given twice")
        if kind.startswith("list"):
            inner = kind[len("list["):-1]
            settings[key] = [_typed(key, inner, v.strip()) for v in text.split(",") if v.strip()]
        else:
            settings[key] = _typed(key, kind, text)
    return settings


def _typed(key: str, kind: str, text: str):
    try:
        if kind == "bool":
            return {"true": True, "false": False}[text.lower()]
        return {"int": int, "float": float}.get(kind, str)(text)
    except (KeyError, ValueError):
        raise FloranaError(f"--set {key}: {text!r} is not a{'n' if kind == 'int' else ''} {kind}") from None


def plan_runs(base: RunConfig, methods: list[str], seeds: list[int], alphas: list[float],
              grid: dict[str, list] | None = None) -> list[tuple[str, RunConfig]]:
    """Each run's folder name and config: every alpha × seed × grid values × method. A grid key named after a
    method (lora_fair_steps) varies for that method's runs only; the others run once with the base value. A grid
    value equal to the base's is the base run, with its plain name: an ablation reuses the finished runs of the
    default and runs only its variants."""
    grid = grid or {}
    plan: dict[str, RunConfig] = {}
    for alpha, seed, values, method in itertools.product(alphas, seeds, itertools.product(*grid.values()), methods):
        extra = {k: v for k, v in zip(grid, values) if method_owning(k) in (None, method)}
        name = run_name(method, alpha, seed, {k: v for k, v in extra.items() if v != getattr(base, k)})
        if name not in plan:
            plan[name] = base.with_overrides(method=method, seed=seed, alpha=alpha, **extra)
    return list(plan.items())


def recorded(sources: list[Path], wanted: list[tuple[RunConfig, str]]) -> dict[str, Run]:
    """Of the finished runs in `sources` (report.summary.find_runs), those standing in for a wanted (config, name):
    the same name and config, save how it runs (HOW_IT_RUNS) and other methods' keys (run_differences)."""
    if not sources or not wanted:
        return {}
    found = {r.name: r for r in find_runs(sources) if finished(r)}
    held = {}
    for config, name in wanted:
        r = found.get(name)
        if r is None or not r.config:
            continue
        old = config_from_dict(r.config, str(r.summary or r.folder))
        changes = {k: v for k, v in run_differences(old, config).items() if k not in HOW_IT_RUNS}
        if changes:
            log.warning("%s: recorded in %s with another config (%s); it runs anew", name, r.summary or r.folder,
                        describe(changes))
        else:
            held[name] = r
    return held


# keys that change how a run executes, not what it computes: a folder whose run differs only in them is reused as it is
HOW_IT_RUNS = frozenset({"threads", "keep_checkpoints"})


def compare(base: RunConfig, methods: list[str], seeds: list[int], alphas: list[float], out: Path,
            progress=None, force: bool = False, target: float = TARGET, baseline: str = BASELINE,
            grid: dict[str, list] | None = None, reuse: list[Path] | None = None) -> list[dict]:
    """Runs (or resumes, or reuses when finished) each combination under out/, then writes the summary
    (report.summary: tables with intervals over seeds, paired differences against `baseline`, the cost of reaching
    `target`, plots/<setting>/, provenance). `grid` adds config keys to vary (plan_runs). The partition depends only
    on the seed and the config, never on the method. A run folder is reused only for the same config (HOW_IT_RUNS
    aside: it resumes with its own); otherwise an error, or with `force` the old run is removed. A run another
    process is running (another compare on the same folder) is left to it and out of this summary: several
    compares over one folder share its runs without running one twice. `reuse` names summary (or run) folders
    whose finished runs stand in for planned runs of the same name and config that out/ has not begun (recorded):
    a study grows on another machine from its committed summaries without running what they hold again."""
    out = Path(out)
    check_compare_folder(out)
    plan = [(config, out / name) for name, config in plan_runs(base, methods, seeds, alphas, grid)]
    held = recorded(reuse or [], [(config, run_dir.name) for config, run_dir in plan
                                  if not (run_dir / "config.toml").exists()])
    for config, run_dir in plan:  # all checked before any run starts
        changes = run_differences(resumed_config(run_dir), config) if (run_dir / "config.toml").exists() else {}
        if changes := {k: v for k, v in changes.items() if k not in HOW_IT_RUNS}:
            if not force:
                raise FloranaError(f"{run_dir}: holds a run of another config ({describe(changes)}); pass --force "
                                   "to redo it, or choose another --out")
            remove_run(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, busy = [], []
    for config, run_dir in plan:
        if run_dir.name in held:
            runs.append(held[run_dir.name])
            continue
        resume = (run_dir / "config.toml").exists()
        done = resume and (run_dir / "global_adapter").is_dir() and len(read_metrics(run_dir)) == config.rounds
        if not done:
            try:
                run(None if resume else config, run_dir, resume=resume, progress=progress)
            except RunInUse as e:
                log.warning("%s; compare goes on with the next run", e)
                busy.append(run_dir.name)
                continue
        runs.append(load_run(run_dir))
    rows = write_summary([r for r in runs if r is not None], out, target, baseline)
    if busy:
        log.warning("not in this summary, being run by other processes: %s", ", ".join(busy))
    return rows
