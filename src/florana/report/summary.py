"""A summary folder from finished runs: summary.md, summary.csv, paired.csv, runs.csv, rounds.csv,
plots/<setting>/*.png, run_configs/<run>.toml and provenance.json. It holds no checkpoints or adapters, so it can be
committed."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

from florana.errors import FloranaError
from florana.federation.checkpoint import write_text_atomic
from florana.federation.methods import ALL_METHODS
from florana.report import tables
from florana.report.plots import paired_panel, plot_bands
from florana.report.provenance import git_commit, machine, now, read_sessions
from florana.report.stats import BOOTSTRAP_SEED, CONFIDENCE, RESAMPLES, TIE
from florana.report.tables import BASELINE, TARGET, Run

SUMMARY_FILES = ("summary.md", "summary.csv", "paired.csv", "runs.csv", "rounds.csv", "paired_rounds.csv",
                 "provenance.json")
SUMMARY_FOLDERS = ("plots", "run_configs")


def load_run(run_dir: Path) -> Run | None:
    """A run folder's history and config (None for a run with no finished round)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FloranaError(f"{run_dir}: no metrics.jsonl (not a florana run folder)")
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not history:
        return None
    config = {}
    if (run_dir / "config.toml").is_file():
        try:
            config = tomllib.loads((run_dir / "config.toml").read_text())
        except tomllib.TOMLDecodeError as e:
            raise FloranaError(f"{run_dir / 'config.toml'}: invalid TOML ({e})") from None
    return Run(history, config, name=run_dir.name, folder=run_dir)


def find_runs(folders: list[Path]) -> list[Run]:
    """The runs in these folders, each a run folder or a folder of runs (compare's --out), in the order of
    ALL_METHODS; ones with no finished round are left out. Two runs of one folder name get their parent's name in
    front."""
    runs = []
    for d in folders:
        found = [d] if (d / "metrics.jsonl").is_file() else sorted(p.parent for p in d.glob("*/metrics.jsonl"))
        if not found:
            raise FloranaError(f"{d}: no metrics.jsonl in it or its sub-folders (not a florana run)")
        runs += [r for r in (load_run(f) for f in found) if r is not None]
    order = {m: i for i, m in enumerate(ALL_METHODS)}  # tables list methods as `--methods all` runs them
    runs.sort(key=lambda r: (order.get(r.method, len(order)), r.method, r.alpha is None, r.alpha or 0,
                             r.seed is None, r.seed or 0, r.name))
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:
        if counts[r.name] > 1:
            r.name = f"{r.folder.resolve().parent.name}-{r.name}"
    return runs


def slug(setting: str) -> str:
    """A folder name for a setting: 'alpha=0.5, rounds=3' → 'alpha0.5-rounds3'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", setting.replace("=", "").replace(", ", "-")) or "all"


def write_summary(runs: list[Run], out: Path, target: float = TARGET, baseline: str = BASELINE) -> list[dict]:
    """Label the runs, then write every summary file into `out`; returns summary.csv's rows."""
    out = Path(out)
    tables.label_runs(runs)
    rows = tables.summarize(runs, target)
    pairs = tables.paired(runs, baseline)
    out.mkdir(parents=True, exist_ok=True)
    # matplotlib's cache at the summary's top (.mpl: the folder checks know it, .gitignore keeps it out of results/),
    # not inside plots/, where plot_bands would put it
    os.environ.setdefault("MPLCONFIGDIR", str(out / ".mpl"))
    plots = {}
    for setting, group in _by_setting(runs).items():
        plots[setting] = f"plots/{slug(setting)}"
        plot_bands(_histories_by_label(group), out / plots[setting])
    diffs = tables.paired_histories(runs, baseline)
    for setting, group in _by_setting(diffs).items():
        plot_bands(_histories_by_label(group), out / plots[setting], panels=(paired_panel(baseline),))
    info = provenance(runs, out, target, baseline)
    head = _header(runs, info, target)
    write_text_atomic(out / "summary.md", head + tables.to_markdown(rows, pairs, baseline, plots))
    write_text_atomic(out / "summary.csv", tables.to_csv(rows))
    write_text_atomic(out / "paired.csv", tables.paired_csv(pairs))
    write_text_atomic(out / "runs.csv", tables.runs_csv(runs, target))
    write_text_atomic(out / "rounds.csv", tables.rounds_csv(runs))
    write_text_atomic(out / "paired_rounds.csv", tables.rounds_csv(diffs))
    write_text_atomic(out / "provenance.json", json.dumps(info, indent=1) + "\n")
    return rows


def _histories_by_label(runs: list[Run]) -> dict[str, list[list[dict]]]:
    out: dict[str, list[list[dict]]] = {}
    for r in runs:
        out.setdefault(r.label, []).append(r.history)
    return out


def _by_setting(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.setting, []).append(r)
    return out


def provenance(runs: list[Run], out: Path, target: float, baseline: str) -> dict:
    """provenance.json: how the summary was made (commit, machine, statistics' parameters) and, per run, its
    setting, seed, rounds, seconds, its sessions (the commit and machine each start or resume ran on) and its
    resolved config, copied into run_configs/ (stale copies from an earlier summary are removed)."""
    configs = out / "run_configs"
    configs.mkdir(exist_ok=True)
    listed = []
    for r in runs:
        entry = {"name": r.name, "method": r.method, "label": r.label, "setting": r.setting, "seed": r.seed,
                 "rounds_done": r.history[-1]["round"], "rounds": r.config.get("rounds"),
                 "finished": bool(r.folder and (r.folder / "global_adapter").is_dir()
                                  and r.history[-1]["round"] == r.config.get("rounds")),
                 "seconds": tables.run_numbers(r.history, target)["seconds"], "config": None,
                 "sessions": read_sessions(r.folder) if r.folder else []}
        if r.folder and (r.folder / "config.toml").is_file():
            entry["config"] = f"run_configs/{r.name}.toml"
            write_text_atomic(configs / f"{r.name}.toml", (r.folder / "config.toml").read_text())
        listed.append(entry)
    kept = {f"{r.name}.toml" for r in runs}
    for stale in configs.glob("*.toml"):
        if stale.name not in kept:
            stale.unlink()
    return {"written": now(), "git": git_commit(), "machine": machine(),
            "statistics": {"confidence": CONFIDENCE, "interval": "Student t over seeds", "tie": TIE,
                           "bootstrap": {"resamples": RESAMPLES, "seed": BOOTSTRAP_SEED, "kind": "percentile"},
                           "target": target, "baseline": baseline},
            "runs": listed}


def _header(runs: list[Run], info: dict, target: float) -> str:
    labels = ", ".join(dict.fromkeys(r.label for r in runs))
    seeds = ", ".join(str(s) for s in sorted({r.seed for r in runs}, key=lambda s: (s is None, s)))
    settings = "; ".join(dict.fromkeys(r.setting for r in runs))
    commits = {s["git"]["commit"][:10] + (" (modified)" if s["git"]["dirty"] else "")
               for e in info["runs"] for s in e["sessions"]}
    machines = {f"{s['machine']['cpu']}, {s['machine']['cpus_usable']} usable cores"
                + (f", {', '.join(s['machine']['gpus'])}" if s["machine"].get("gpus") else "")
                for e in info["runs"] for s in e["sessions"]}
    hours = sum(e["seconds"] for e in info["runs"]) / 3600
    recorded = sum(bool(e["sessions"]) for e in info["runs"])
    lines = ["# florana: summary", "",
             f"{len(runs)} runs: {labels}; seeds {seeds}; settings {settings}. Target accuracy {target:g}.",
             f"Rounds took {hours:.2f} h of wall time in all (the sum of each round's seconds; loading not counted).",
             f"Runs ran at commit(s) {', '.join(sorted(commits)) or 'not recorded'} on "
             f"{'; '.join(sorted(machines)) or 'machines not recorded'} ({recorded} of {len(runs)} runs recorded "
             "their sessions); each run's resolved config is in run_configs/, the details in provenance.json.", ""]
    return "\n".join(lines) + "\n"
