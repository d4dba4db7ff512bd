"""A summary folder from finished runs: summary.md, summary.csv, paired.csv, runs.csv, rounds.csv,
plots/<setting>/*.png, run_configs/<run>.toml, histories/<run>.jsonl and provenance.json. It holds no checkpoints or
adapters, so it can be committed; and it holds each run's record (config, history, sessions), so a later summary can
take its runs as they are, on another machine, beside new ones (find_runs)."""

from __future__ import annotations

import csv
import json
import os
import re
import tomllib
from pathlib import Path

from florana.errors import FloranaError
from florana.federation.checkpoint import write_text_atomic
from florana.federation.methods import ALL_METHODS
from florana.report import tables
from florana.report.plots import Recorded, paired_panel, plot_bands
from florana.report.provenance import git_commit, machine, now, read_sessions
from florana.report.stats import BOOTSTRAP_SEED, CONFIDENCE, RESAMPLES, TIE
from florana.report.tables import BASELINE, TARGET, Run

SUMMARY_FILES = ("summary.md", "summary.csv", "paired.csv", "runs.csv", "rounds.csv", "paired_rounds.csv",
                 "provenance.json")
SUMMARY_FOLDERS = ("plots", "run_configs", "histories")


def _history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise FloranaError(f"{path}: invalid TOML ({e})") from None


def load_run(run_dir: Path) -> Run | None:
    """A run folder's history and config (None for a run with no finished round)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FloranaError(f"{run_dir}: no metrics.jsonl (not a florana run folder)")
    history = _history(path)
    if not history:
        return None
    config = _toml(run_dir / "config.toml") if (run_dir / "config.toml").is_file() else {}
    return Run(history, config, name=run_dir.name, folder=run_dir)


def _number(key: str, text: str):
    if text == "":
        return None
    return int(text) if key in ("rounds", "best_round", "rounds_to_target") else float(text)


def load_summary(folder: Path) -> list[Run]:
    """The runs a summary folder records: each with its config (run_configs/) and its history (histories/), or,
    in a summary made before summaries kept histories, only its row of runs.csv."""
    folder = Path(folder)
    try:
        info = json.loads((folder / "provenance.json").read_text())
        entries, target = info["runs"], info["statistics"]["target"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FloranaError(f"{folder / 'provenance.json'}: not a florana summary's provenance ({e})") from None
    members: dict[tuple, list[str]] = {}  # the runs it grouped: its (label, setting) → their names
    for entry in entries:
        members.setdefault((entry.get("label"), entry.get("setting")), []).append(entry["name"])
    rows = {}
    if (folder / "runs.csv").is_file():
        with open(folder / "runs.csv", newline="") as f:
            rows = {row["name"]: row for row in csv.DictReader(f)}
    runs = []
    for entry in entries:
        name = entry["name"]
        config = _toml(folder / entry["config"]) if entry.get("config") else {}
        record = {**entry, "target": target}
        if (folder / "histories" / f"{name}.jsonl").is_file():
            runs.append(Run(_history(folder / "histories" / f"{name}.jsonl"), config, name=name, summary=folder,
                            entry=record))
        elif name in rows and config:
            numbers = {k: _number(k, rows[name].get(k, "")) for k in tables.NUMBER_KEYS}
            record.update(group=members[(entry.get("label"), entry.get("setting"))],
                          confidence=info["statistics"].get("confidence"))
            runs.append(Run([], config, name=name, summary=folder, entry=record, numbers=numbers))
        else:
            raise FloranaError(f"{folder}: run {name} has neither a history (histories/{name}.jsonl) nor a row "
                               "in runs.csv with its config")
    return runs


def find_runs(folders: list[Path], only: str | None = None) -> list[Run]:
    """The runs in these folders, each a run folder, a folder of runs (compare's --out) or a summary folder (its
    recorded runs), in the order of ALL_METHODS; ones with no finished round are left out, and with `only` (a
    regular expression) those whose name it does not match. A run met twice by name is taken once: a run folder
    over a recorded copy, a recorded history over recorded numbers alone (their configs must agree); two different
    runs of one name get their parent's name in front."""
    runs = []
    for d in folders:
        found = [d] if (d / "metrics.jsonl").is_file() else sorted(p.parent for p in d.glob("*/metrics.jsonl"))
        if found:
            runs += [r for r in (load_run(f) for f in found) if r is not None]
        elif (d / "provenance.json").is_file():
            runs += load_summary(d)
        else:
            raise FloranaError(f"{d}: no metrics.jsonl in it or its sub-folders, and no provenance.json (not a florana "
                               "run or summary)")
    if only is not None:
        try:
            runs = [r for r in runs if re.search(only, r.name)]
        except re.error as e:
            raise FloranaError(f"--runs {only!r}: not a regular expression ({e})") from None
    runs = _once(runs)
    order = {m: i for i, m in enumerate(ALL_METHODS)}  # tables list methods as `--methods all` runs them
    runs.sort(key=lambda r: (order.get(r.method, len(order)), r.method, r.alpha is None, r.alpha or 0,
                             r.seed is None, r.seed or 0, r.name))
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:
        if counts[r.name] > 1:
            r.name = f"{(r.folder.resolve().parent if r.folder else r.summary.resolve()).name}-{r.name}"
    return runs


def recorded_rounds(runs: list[Run], file: str = "rounds.csv", baseline: str | None = None,
                    confidence: float = CONFIDENCE) -> dict[tuple[str, str], list[dict]]:
    """Per labelled group (setting, label) whose runs all come with numbers alone (load_summary) and are the very
    runs their summary grouped: that group's rows of the summary's `file`, relabelled (paired_rounds.csv with
    `baseline`, whose group must be such a group of the same summary and setting). A group's per-round means and
    intervals are a function of its runs, so they stand as recorded: the curves survive the lost histories."""
    grouped = tables.groups(runs)
    files: dict[Path, list[dict]] = {}
    out = {}
    for (setting, label), members in grouped.items():
        place = _recorded_group(members, confidence)
        if place is None or label == baseline:
            continue
        if baseline is not None:
            base = _recorded_group(grouped.get((setting, baseline), []), confidence)
            if base is None or base[:2] != place[:2] or base[2] != baseline:
                continue
        summary, old_setting, old_label = place
        if summary not in files:
            files[summary] = _round_rows(summary / file)
        rows = [row for row in files[summary] if (row["setting"], row["method"]) == (old_setting, old_label)]
        if rows:
            out[(setting, label)] = [{**row, "method": label, "setting": setting} for row in rows]
    return out


def _recorded_group(members: list[Run], confidence: float) -> tuple | None:
    """(summary, setting, label) where one summary recorded exactly these runs, numbers alone, as one group at this
    confidence."""
    if not members or any(r.history or r.summary is None for r in members):
        return None
    places = {(r.summary, r.entry.get("setting"), r.entry.get("label")) for r in members}
    first = members[0].entry
    if (len(places) != 1 or first.get("confidence") != confidence
            or sorted(first.get("group", [])) != sorted(r.name for r in members)):
        return None
    return places.pop()


def _round_rows(path: Path) -> list[dict]:
    """rounds.csv's rows, as numbers (empty cells: None); no file, no rows."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: v if k in ("method", "setting") else None if v == "" else int(v) if k in ("round", "seeds")
                 else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def finished(run: Run) -> bool:
    """The run did all its rounds and wrote its global adapter (a recorded run: its summary said so)."""
    if run.folder is None:
        return bool(run.entry.get("finished"))
    return (run.folder / "global_adapter").is_dir() and run.history[-1]["round"] == run.config.get("rounds")


def _once(runs: list[Run]) -> list[Run]:
    """One run per name and config: the run folder, else the recorded history, else the recorded numbers."""
    def rank(r: Run) -> int:
        return 0 if r.folder else 1 if r.history else 2
    keys = [(r.name, json.dumps(r.config, sort_keys=True, default=str)) for r in runs]
    kept: dict[tuple[str, str], Run] = {}
    for key, r in zip(keys, runs):
        if key not in kept or rank(r) < rank(kept[key]):
            kept[key] = r
    return [r for key, r in zip(keys, runs) if kept[key] is r]


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
    traced = [r for r in runs if r.history]  # runs with only recorded numbers have curves only as recorded
    diffs = tables.paired_histories(traced, baseline)
    recorded = recorded_rounds(runs)  # read before anything is written: `out` may be the summary they come from
    recorded_diffs = recorded_rounds(runs, "paired_rounds.csv", baseline)
    order = list(tables.groups(runs))
    plots = {}
    for setting, lines in _lines(order, traced, recorded).items():
        plots[setting] = f"plots/{slug(setting)}"
        plot_bands(lines, out / plots[setting])
    for setting, lines in _lines(order, diffs, recorded_diffs).items():
        plot_bands(lines, out / plots[setting], panels=(paired_panel(baseline),))
    info = provenance(runs, out, target, baseline)
    head = _header(runs, info, target, len(recorded))
    write_text_atomic(out / "summary.md", head + tables.to_markdown(rows, pairs, baseline, plots))
    write_text_atomic(out / "summary.csv", tables.to_csv(rows))
    write_text_atomic(out / "paired.csv", tables.paired_csv(pairs))
    write_text_atomic(out / "runs.csv", tables.runs_csv(runs, target))
    write_text_atomic(out / "rounds.csv", tables.rounds_csv(runs, recorded))
    write_text_atomic(out / "paired_rounds.csv", tables.rounds_csv(diffs, recorded_diffs))
    write_text_atomic(out / "provenance.json", json.dumps(info, indent=1) + "\n")
    return rows


def _lines(order: list[tuple[str, str]], runs: list[Run], recorded: dict) -> dict[str, dict]:
    """Per setting, per label, in `order` (the groups of all runs): plot_bands' line, its runs' histories or the
    rows recorded for it."""
    histories = {key: [r.history for r in members] for key, members in tables.groups(runs).items()}
    out: dict[str, dict] = {}
    for setting, label in order:
        line = histories.get((setting, label)) or (
            Recorded(recorded[(setting, label)]) if (setting, label) in recorded else None)
        if line:
            out.setdefault(setting, {})[label] = line
    return out


def provenance(runs: list[Run], out: Path, target: float, baseline: str) -> dict:
    """provenance.json: how the summary was made (commit, machine, statistics' parameters) and, per run, its
    setting, seed, rounds, seconds, its sessions (the commit and machine each start or resume ran on) and its
    record: its resolved config, copied into run_configs/, and its history, into histories/ (stale copies from an
    earlier summary are removed). A run taken from another summary keeps the sessions and finished flag it has
    there."""
    records = {"run_configs": ".toml", "histories": ".jsonl"}
    for folder in records:
        (out / folder).mkdir(exist_ok=True)
    listed = []
    for r in runs:
        numbers = tables.numbers_of(r, target)
        entry = {"name": r.name, "method": r.method, "label": r.label, "setting": r.setting, "seed": r.seed,
                 "rounds_done": numbers["rounds"], "rounds": r.config.get("rounds"), "seconds": numbers["seconds"],
                 "config": None}
        entry["finished"] = finished(r)
        if r.folder:
            entry["sessions"] = read_sessions(r.folder)
            config = r.folder / "config.toml"
        else:
            entry["sessions"] = r.entry.get("sessions", [])
            config = r.summary / r.entry["config"] if r.summary and r.entry.get("config") else None
        if config is not None and config.is_file():
            entry["config"] = f"run_configs/{r.name}.toml"
            if (out / entry["config"]).resolve() != config.resolve():
                write_text_atomic(out / entry["config"], config.read_text())
        if r.history:
            write_text_atomic(out / "histories" / f"{r.name}.jsonl", "".join(json.dumps(m) + "\n" for m in r.history))
        listed.append(entry)
    for folder, suffix in records.items():
        kept = {f"{r.name}{suffix}" for r in runs if folder == "run_configs" or r.history}
        for stale in (out / folder).glob(f"*{suffix}"):
            if stale.name not in kept:
                stale.unlink()
    return {"written": now(), "git": git_commit(), "machine": machine(),
            "statistics": {"confidence": CONFIDENCE, "interval": "Student t over seeds", "tie": TIE,
                           "bootstrap": {"resamples": RESAMPLES, "seed": BOOTSTRAP_SEED, "kind": "percentile"},
                           "target": target, "baseline": baseline},
            "runs": listed}


def _header(runs: list[Run], info: dict, target: float, carried: int = 0) -> str:
    labels = ", ".join(dict.fromkeys(r.label for r in runs))
    seeds = ", ".join(str(s) for s in sorted({r.seed for r in runs}, key=lambda s: (s is None, s)))
    settings = "; ".join(dict.fromkeys(r.setting for r in runs))
    commits = {s["git"]["commit"][:10] + (" (modified)" if s["git"]["dirty"] else "")
               for e in info["runs"] for s in e["sessions"]}
    machines = {f"{s['machine']['cpu']}, {s['machine']['cpus_usable']} usable cores"
                + (f", {', '.join(s['machine']['gpus'])}" if s["machine"].get("gpus") else "")
                + (f", computing in {s['precision']}" if s.get("precision") else "")
                for e in info["runs"] for s in e["sessions"]}
    hours = sum(e["seconds"] for e in info["runs"]) / 3600
    recorded = sum(bool(e["sessions"]) for e in info["runs"])
    lines = ["# florana: summary", "",
             f"{len(runs)} runs: {labels}; seeds {seeds}; settings {settings}. Target accuracy {target:g}.",
             f"Rounds took {hours:.2f} h of wall time in all (the sum of each round's seconds; loading not counted).",
             f"Runs ran at commit(s) {', '.join(sorted(commits)) or 'not recorded'} on "
             f"{'; '.join(sorted(machines)) or 'machines not recorded'} ({recorded} of {len(runs)} runs recorded "
             "their sessions); each run's resolved config is in run_configs/, its history in histories/, the details "
             "in provenance.json."]
    if bare := sum(not r.history for r in runs):
        lines.append(f"{bare} of the runs come with only the numbers runs.csv kept for them (their summary was made "
                     "before summaries kept histories): they count in every per-run table; in rounds.csv, "
                     "paired_rounds.csv and the plots only where a method's runs in a setting are the very runs "
                     f"their summary grouped ({carried} such group{'' if carried == 1 else 's'}), with the "
                     "per-round rows it recorded.")
    lines.append("")
    return "\n".join(lines) + "\n"
