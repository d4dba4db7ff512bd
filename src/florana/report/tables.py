"""Summary tables over runs: per method and setting, the mean, std and 95% t interval over seeds of each run's
numbers; paired differences against a baseline method on the same seeds and partitions; the cost of reaching a
target accuracy. Markdown, CSV and a rich table."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from florana.config import FIELDS, default_of
from florana.errors import FloranaError
from florana.report.plots import value
from florana.report.stats import CONFIDENCE, TIE, Estimate, Paired, first_reached, mean_ci, median_reached, paired_diff

ROUND_DIGITS = 5  # significant digits of the per-round tables: means over a few seeds, in 1,000s of rows (at 7 the
# Rotten Tomatoes table of 45 groups would pass the 1 MiB a tracked file may hold)
TARGET = 0.70  # the default target accuracy of time-to-accuracy and bytes-to-accuracy
BASELINE = "fedit"
# config keys that never make two runs' results incomparable (speed and bookkeeping only)
NOT_A_SETTING = frozenset({"method", "seed", "threads", "keep_checkpoints", "device", "eval_batch_size"})

# per-run numbers summarised over seeds: key, title, digits
STATS = (
    ("global_accuracy", "final global acc", 3),
    ("best_global_accuracy", "best-round acc", 3),
    ("mean_global_accuracy", "mean acc over rounds", 3),
    ("local_accuracy_mean", "local acc", 3),
    ("local_majority_mean", "own-majority floor", 3),
    ("global_macro_f1", "macro-F1", 3),
    ("local_global_gap", "local−global gap", 3),
    ("relative_error", "agg. error", 4),
    ("fedit_error", "FedIT's error, same updates", 4),
    ("error_floor", "rank-r floor", 4),
    ("total_mib", "MiB", 2),
    ("seconds", "round seconds", 0),
)
QUALITY = 6  # STATS[:QUALITY] are the quality table's columns, the rest the aggregation and cost table's
# costs until the target is first reached, summarised by their median over seeds: key, title, digits
COSTS = (("rounds_to_target", "rounds", 0), ("mib_to_target", "MiB", 2), ("seconds_to_target", "seconds", 0))
PAIRED_METRICS = (("global_accuracy", "final acc"), ("best_global_accuracy", "best-round acc"),
                  ("mean_global_accuracy", "mean acc over rounds"), ("local_accuracy_mean", "local acc"))


@dataclass
class Run:
    """One run's history with what groups it: its method label (the method, and its own options where runs of
    that method differ in them), its setting (the other config keys that differ between runs) and its seed. A run
    read from a summary folder (`summary`) made before summaries kept histories has no history, only the per-run
    numbers its runs.csv kept (`numbers`, for the target in `entry`, its provenance.json entry)."""

    history: list[dict]
    config: dict = field(default_factory=dict)  # the run's config.toml as parsed; empty where it has none
    name: str = ""
    folder: Path | None = None
    label: str = ""
    setting: str = ""
    summary: Path | None = None  # the summary folder the run was read from, for one recorded there
    entry: dict = field(default_factory=dict)  # its provenance.json entry there
    numbers: dict | None = None  # its runs.csv row there, where the summary kept no history

    def _last(self, name: str):
        return self.history[-1].get(name) if self.history else self.config.get(name)

    @property
    def method(self) -> str:
        return self._last("method")

    @property
    def seed(self):
        return self._last("seed")

    @property
    def alpha(self):
        return self._last("alpha")

    def key(self, name: str):
        """A config key's value: from config.toml; a key it lacks (written before the key existed) has its default;
        with no config.toml, alpha, seed and method come from the metrics and other keys are None."""
        if name in self.config:
            return self.config[name]
        if self.config and name in FIELDS:
            return default_of(name)
        return self._last(name)


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def label_runs(runs: list[Run]) -> list[Run]:
    """Give each run its label and setting. The setting is alpha and every other config key whose value differs
    between runs, save seeds and the keys named after a method (fedsvd_period, lora_fair_*): those differing
    between runs of their own method label variants of it ('lora_fair[steps=10]'), and are ignored otherwise, also
    in a table without that method (FedIT runs made before and after florana_prox's default changed are one
    setting)."""
    from florana.federation.methods import method_owning as owner  # every aggregator's (a bound has no options)

    names = sorted({k for r in runs for k in r.config} - NOT_A_SETTING)

    def differs(key: str, group: list[Run]) -> bool:
        return len({repr(r.key(key)) for r in group}) > 1
    setting_keys = ["alpha"] + [k for k in names if k != "alpha" and owner(k) is None and differs(k, runs)]
    for r in runs:
        own = [k for k in names if owner(k) == r.method and differs(k, [x for x in runs if x.method == r.method])]
        r.label = r.method + (f"[{', '.join(f'{k[len(r.method) + 1:]}={_show(r.key(k))}' for k in own)}]"
                              if own else "")
        r.setting = ", ".join(f"{k}={_show(r.key(k))}" for k in setting_keys)
    seen: dict[tuple, Run] = {}
    for r in runs:
        if (twin := seen.setdefault((r.label, r.setting, r.seed), r)) is not r:
            raise FloranaError(f"two runs of {r.label}, {r.setting}, seed {r.seed}: {twin.folder or twin.name} and "
                               f"{r.folder or r.name}; summarise one of them")
    return runs


def run_numbers(history: list[dict], target: float = TARGET) -> dict:
    """One run's numbers: the final round's accuracies (the global one on the whole test set where rounds scored a
    subset: eval_max_examples), the best round's, the mean over the rounds scored, the mean aggregation error (and
    FedIT's on the same updates, and the rank-r floor) over rounds, the MiB and seconds of all rounds, and the
    rounds, MiB and seconds until the global accuracy first reached `target` (None: never)."""
    last = history[-1]

    def mean_of(key):
        vals = [m[key] for m in history if m.get(key) is not None]
        return float(np.mean(vals)) if vals else None
    accs = [m.get("global_accuracy") for m in history]
    scored = [a for a in accs if a is not None]
    seconds = np.cumsum([m.get("seconds") or 0.0 for m in history])
    hit = first_reached(accs, target)
    return {
        "rounds": last["round"],
        "global_accuracy": last.get("final_global_accuracy", last.get("global_accuracy")),  # the whole test set
        "best_global_accuracy": max(scored) if scored else None,
        "best_round": history[accs.index(max(scored))]["round"] if scored else None,
        # the area under the accuracy curve over the rounds: lower where a method lags early, at equal final accuracy
        "mean_global_accuracy": float(np.mean(scored)) if scored else None,
        "local_accuracy_mean": last.get("local_accuracy_mean"),
        "local_majority_mean": last.get("local_majority_mean"),  # its clients answering their own majority class
        "global_macro_f1": last.get("global_macro_f1"),
        "local_global_gap": last.get("local_global_gap"),
        "relative_error": mean_of("relative_error"),
        "fedit_error": mean_of("fedit_error"),
        "error_floor": mean_of("error_floor"),
        "total_mib": value(last, "cum_mib"),
        "seconds": float(seconds[-1]),
        "rounds_to_target": None if hit is None else history[hit]["round"],
        "mib_to_target": None if hit is None else value(history[hit], "cum_mib"),
        "seconds_to_target": None if hit is None else float(seconds[hit]),
        "dp_epsilon_max": last.get("dp_epsilon_max"),  # DP runs: the largest client ε at its δ after the last round
    }


def numbers_of(run: Run, target: float | None = TARGET) -> dict:
    """run_numbers of the run's history; for a run with only the numbers a summary kept, those (their
    time-to-target is for that summary's target: another target is an error; None: no time-to-target wanted)."""
    if run.history:
        return run_numbers(run.history, TARGET if target is None else target)
    kept = run.entry.get("target", TARGET)
    if target is not None and target != kept:
        raise FloranaError(f"{run.summary}: run {run.name} has only the numbers its summary kept (no history), "
                           f"whose time-to-target is for the target {kept:g}; summarise it with --target {kept:g}")
    return run.numbers


def groups(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Labelled runs by (setting, label), settings in order of first appearance, runs in seed order."""
    out: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        out[(r.setting, r.label)].append(r)
    return {k: sorted(v, key=lambda r: (r.seed is None, r.seed)) for k, v in
            sorted(out.items(), key=lambda kv: [r.setting for r in runs].index(kv[0][0]))}


def summarize(runs: list[Run], target: float = TARGET, confidence: float = CONFIDENCE) -> list[dict]:
    """One row per (method label, setting): each of STATS as mean, std, t-interval bounds and n over seeds; how
    many seeds reached `target` and the median cost of reaching it (None unless more than half did)."""
    rows = []
    for (setting, label), members in groups(runs).items():
        numbers = [numbers_of(r, target) for r in members]
        row = {"method": label, "setting": setting, "alpha": members[0].alpha, "seeds": len(members),
               "seed_list": " ".join(str(r.seed) for r in members), "rounds": max(n["rounds"] for n in numbers)}
        for key, _, _ in STATS:
            est = mean_ci([n[key] for n in numbers if n[key] is not None], confidence)
            row.update({key: est.mean, key + "_std": est.std, key + "_ci_low": est.low, key + "_ci_high": est.high,
                        key + "_n": est.n})
        spent = [n["dp_epsilon_max"] for n in numbers if n["dp_epsilon_max"] is not None]
        row["dp_epsilon_max"] = max(spent) if spent else None  # the worst over seeds
        row["target"] = target
        row["target_reached"] = sum(n["rounds_to_target"] is not None for n in numbers)
        for key, _, _ in COSTS:
            row[key + "_median"] = median_reached([n[key] for n in numbers])
        rows.append(row)
    return rows


def paired(runs: list[Run], baseline: str = BASELINE, tie: float = TIE, confidence: float = CONFIDENCE) -> list[dict]:
    """Every other method label against `baseline` on the same (setting, seed), per setting and, with several
    settings, pooled over them ('all'): per metric of PAIRED_METRICS, the paired difference (method − baseline)."""
    base = {(r.setting, r.seed): numbers_of(r, None) for r in runs if r.label == baseline}
    by_setting = groups(runs)
    settings = list(dict.fromkeys(s for s, _ in by_setting))
    labels = list(dict.fromkeys(label for _, label in by_setting if label != baseline))
    scopes = [(s, [s]) for s in settings] + ([("all", settings)] if len(settings) > 1 else [])
    rows = []
    for scope, members in scopes:
        for label in labels:
            runs_here = [r for s in members for r in by_setting.get((s, label), [])]
            if not runs_here:
                continue
            for key, _ in PAIRED_METRICS:
                pairs = [(numbers_of(r, None)[key], base[(r.setting, r.seed)][key]) for r in runs_here
                         if (r.setting, r.seed) in base]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if not pairs:
                    continue
                p = paired_diff([a for a, _ in pairs], [b for _, b in pairs], tie, confidence)
                rows.append(paired_row(label, scope, key, baseline, p))
    return rows


def paired_row(label: str, setting: str, metric: str, baseline: str, p: Paired) -> dict:
    boot = p.bootstrap or (None, None)
    return {"method": label, "setting": setting, "metric": metric, "baseline": baseline, "n": p.n,
            "diff_mean": p.diff.mean, "diff_std": p.diff.std, "t_ci_low": p.diff.low, "t_ci_high": p.diff.high,
            "p_value": p.p_value, "bootstrap_ci_low": boot[0], "bootstrap_ci_high": boot[1], "wins": p.wins,
            "ties": p.ties, "losses": p.losses}


# ---- formatting ---------------------------------------------------------------------------------------------
def _num(v, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def estimate_cell(row: dict, key: str, digits: int, interval: bool = True) -> str:
    """'mean ± std [low, high]' over seeds; 'mean (n=1)' for one seed; '–' for none."""
    est = Estimate(row[key + "_n"], row[key], row[key + "_std"], row[key + "_ci_low"], row[key + "_ci_high"])
    if est.mean is None:
        return "–"
    if est.std is None:
        return f"{est.mean:.{digits}f} (n=1)"
    cell = f"{est.mean:.{digits}f} ± {est.std:.{digits}f}"
    return cell + f" [{est.low:.{digits}f}, {est.high:.{digits}f}]" if interval else cell


def cost_cell(row: dict, key: str, digits: int) -> str:
    m = row[key + "_median"]
    return "not reached" if m is None else f"{m:.{digits}f}"


def diff_cell(p: dict, digits: int = 3) -> str:
    """'+0.012 [−0.004, +0.028]' (the paired-t interval), or the difference alone for one pair or for pairs that all
    differ by it."""
    if p["t_ci_low"] is None:
        return f"{p['diff_mean']:+.{digits}f} " + ("(n=1)" if p["n"] == 1 else f"(all {p['n']} pairs)")
    return f"{p['diff_mean']:+.{digits}f} [{p['t_ci_low']:+.{digits}f}, {p['t_ci_high']:+.{digits}f}]"


def _table(head: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in lines]


def to_markdown(rows: list[dict], pairs: list[dict] | None = None, baseline: str = BASELINE,
                plots: dict[str, str] | None = None, confidence: float = CONFIDENCE) -> str:
    """Per setting: quality (mean ± std [t interval] over seeds), aggregation and cost, and the paired
    differences against the baseline; then the pooled paired differences, and how to read it all."""
    pairs = pairs or []
    level = f"{confidence:.0%}"
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        here = [r for r in rows if r["setting"] == setting]
        target = here[0]["target"]
        out += [f"## {setting}", "", f"Quality: mean ± std [{level} t interval] over seeds, at the last round "
                "(best-round: the best round's accuracy, chosen on the test set, so optimistic; mean acc over "
                "rounds: the global accuracy averaged over every round scored, lower where a method lags early).", ""]
        out += _table(["method", "seeds", "rounds"] + [t for k, t, _ in STATS[:QUALITY]],
                      [[r["method"], str(r["seeds"]), str(r["rounds"])] + [estimate_cell(r, k, d) for k, _, d in
                                                                           STATS[:QUALITY]] for r in here])
        out += ["", f"Aggregation (mean over rounds) and cost (mean ± std); the rounds, MiB and seconds until the "
                f"global accuracy first reached {target:g} (median over seeds; 'not reached' unless more than half "
                "of them reached it).", ""]
        out += _table(["method"] + [t for _, t, _ in STATS[QUALITY:]] + [f"reached {target:g}"] +
                      [f"{t} to {target:g}" for _, t, _ in COSTS],
                      [[r["method"]] + [estimate_cell(r, k, d, interval=False) for k, _, d in STATS[QUALITY:]] +
                       [f"{r['target_reached']}/{r['seeds']}"] + [cost_cell(r, k, d) for k, _, d in COSTS]
                       for r in here])
        out += [""] + _paired_table([p for p in pairs if p["setting"] == setting], baseline, level)
        if plots and setting in plots:
            folder = plots[setting]
            paired_plot = (f"accuracy_vs_{baseline}",) if any(p["setting"] == setting for p in pairs) else ()
            out += ["", " ".join(f"![{name}]({folder}/{name}.png)" for name in
                                 ("accuracy", "error", "accuracy_mib", "bytes", *paired_plot)), ""]
        out.append("")
    pooled = [p for p in pairs if p["setting"] == "all"]
    if pooled:
        out += ["## All settings pooled", ""] + _paired_table(pooled, baseline, level) + [""]
    out += ["## How to read this", "",
            f"- Intervals are two-sided {level} Student-t intervals over seeds (mean ± t·std/√n, n−1 degrees of "
            "freedom); one seed shows n=1 and no interval.",
            f"- Paired differences are method − {baseline} on the same setting and seed, hence the same split, "
            "partition and client sampling; the headline interval is the paired t interval, the p-value that of the "
            f"paired t-test. paired.csv adds a percentile bootstrap interval ({_boot_note()}), which with few "
            "seeds is too narrow (3 seeds have 10 distinct resamples): read the t interval there. Where every seed "
            "differs by the same amount there is no spread to build either on: the difference shows alone, '(all n "
            "pairs)', with no p-value (p = 1 where every difference is 0).",
            ("- Own-majority floor: the local accuracy the same clients would score by each answering its own "
             "training data's majority class on its held-out examples (the runs' local_majority_mean; '–' for runs "
             "that predate it). Local accuracy at that floor means the clients kept their label skew and no more."),
            f"- Wins/ties/losses count seeds whose difference is ≥ +{TIE}, within ±{TIE} (a tie), or ≤ −{TIE}.",
            "- Aggregation error: ‖ΔW*−sB̂Â‖/‖ΔW*‖ of the method's aggregate, mean over rounds; FedIT's error is "
            "FedIT's on the same client updates; the rank-r floor is the best any rank-r aggregate can do on them.",
            ""]
    return "\n".join(out)


def _boot_note() -> str:
    from florana.report.stats import BOOTSTRAP_SEED, RESAMPLES

    return f"{RESAMPLES:,} resamples, seed {BOOTSTRAP_SEED}"


def _paired_table(pairs: list[dict], baseline: str, level: str) -> list[str]:
    if not pairs:
        return [f"No paired comparison: no {baseline} runs on these seeds to pair with."]
    labels = list(dict.fromkeys(p["method"] for p in pairs))
    index = {(p["method"], p["metric"]): p for p in pairs}
    head = ["method", "pairs"]
    for _, title in PAIRED_METRICS:
        head += [f"Δ {title} [{level} paired t]", "p", "W/T/L"]
    lines = []
    for label in labels:
        n = max(p["n"] for p in pairs if p["method"] == label)
        cells = [label, str(n)]
        for key, _ in PAIRED_METRICS:
            p = index.get((label, key))
            cells += ["–", "–", "–"] if p is None else [diff_cell(p), _num(p["p_value"], 3),
                                                        f"{p['wins']}/{p['ties']}/{p['losses']}"]
        lines.append(cells)
    return [f"Against {baseline}, paired by seed (difference method − {baseline}):", ""] + _table(head, lines)


def _csv(rows: list[dict], keys: list[str], digits: int | None = None) -> str:
    """CSV text of `rows` under `keys` (empty cells for None); with `digits`, floats to that many significant
    digits, whole ones and those of more digits before the point (byte counts and their means) to the unit, never
    in exponent form."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k), digits) for k in keys})
    return buf.getvalue()


def _cell(v, digits: int | None):
    if v is None:
        return ""
    if digits is None or not isinstance(v, float) or not math.isfinite(v):
        return v
    whole = v.is_integer() or abs(v) >= 10 ** (digits - 1)  # no digit after the point to keep
    return str(round(v)) if whole and abs(v) < 1e15 else format(v, f".{digits}g")


SUMMARY_KEYS = (["method", "setting", "alpha", "seeds", "seed_list", "rounds"]
                + [k + s for k, _, _ in STATS for s in ("", "_std", "_ci_low", "_ci_high", "_n")]
                + ["target", "target_reached"] + [k + "_median" for k, _, _ in COSTS])
PAIRED_KEYS = ["method", "setting", "metric", "baseline", "n", "diff_mean", "diff_std", "t_ci_low", "t_ci_high",
               "p_value", "bootstrap_ci_low", "bootstrap_ci_high", "wins", "ties", "losses"]
NUMBER_KEYS = ["rounds", "global_accuracy", "best_global_accuracy", "best_round", "mean_global_accuracy",
               "local_accuracy_mean", "global_macro_f1", "relative_error", "fedit_error", "error_floor", "total_mib",
               "seconds", "rounds_to_target", "mib_to_target", "seconds_to_target", "local_global_gap",
               "dp_epsilon_max", "local_majority_mean"]  # every key of run_numbers: runs.csv keeps them all
RUN_KEYS = ["name", "method", "setting", "seed", *NUMBER_KEYS]


def to_csv(rows: list[dict]) -> str:
    """summary.csv: one row per method and setting; empty cells where a statistic does not exist."""
    return _csv(rows, SUMMARY_KEYS)


def paired_csv(pairs: list[dict]) -> str:
    return _csv(pairs, PAIRED_KEYS)


def runs_csv(runs: list[Run], target: float = TARGET) -> str:
    """runs.csv: every run's own numbers, the data behind each row of summary.csv."""
    rows = [{"name": r.name, "method": r.label, "setting": r.setting, "seed": r.seed, **numbers_of(r, target)}
            for r in runs]
    return _csv(rows, RUN_KEYS)


def round_rows(runs: list[Run], confidence: float = CONFIDENCE) -> tuple[list[dict], list[str]]:
    """rounds.csv: per method, setting and round, the mean and t interval over seeds of every numeric metric the
    runs record per round (what later versions add comes along), and the cumulative MiB; with its column names."""
    skip = {"round", "seed", "alpha"}
    keys = sorted({k for r in runs for m in r.history for k, v in m.items()
                   if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)})
    keys += ["cum_mib"] if any("cum_bytes_up" in m for r in runs for m in r.history) else []
    rows = []
    for (setting, label), members in groups(runs).items():
        by_round = [{m["round"]: m for m in r.history} for r in members]
        for round_ in sorted(set().union(*by_round)):
            row = {"method": label, "setting": setting, "round": round_,
                   "seeds": sum(round_ in b for b in by_round)}
            for key in keys:
                vals = [value(b[round_], key) for b in by_round if round_ in b]
                est = mean_ci([v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)],
                              confidence)
                row.update({key: est.mean, key + "_ci_low": est.low, key + "_ci_high": est.high})
            rows.append(row)
    return rows, ["method", "setting", "round", "seeds"] + [k + s for k in keys for s in ("", "_ci_low", "_ci_high")]


def rounds_csv(runs: list[Run], recorded: dict[tuple[str, str], list[dict]] | None = None) -> str:
    """rounds.csv (or paired_rounds.csv) of round_rows at ROUND_DIGITS, with the rows a summary recorded for the groups
    (setting, label) in `recorded`, whose runs have no histories here (summary.recorded_rounds), in the order of the
    groups."""
    rows, keys = round_rows(runs)
    if recorded:
        order = {key: i for i, key in enumerate(dict.fromkeys([*groups(runs), *recorded]))}
        rows = sorted(rows + [row for group in recorded.values() for row in group],
                      key=lambda row: order[(row["setting"], row["method"])])  # stable: rounds stay in order
        keys += [k for k in dict.fromkeys(k for group in recorded.values() for row in group for k in row)
                 if k not in keys]  # the recorded file's columns, in its order
    return _csv(rows, keys, ROUND_DIGITS)


def paired_histories(runs: list[Run], baseline: str = BASELINE, key: str = "global_accuracy") -> list[Run]:
    """Every labelled run with a `baseline` run on its setting and seed, as a run whose history is, round by
    round, its `key` minus the baseline's (`key`_vs_`baseline`): averaged over seeds, a paired difference per round
    with its t interval (whether a method lags early, and when it catches up)."""
    name = f"{key}_vs_{baseline}"
    base = {(r.setting, r.seed): {m["round"]: m.get(key) for m in r.history} for r in runs if r.label == baseline}
    out = []
    for r in runs:
        other = base.get((r.setting, r.seed))
        if r.label == baseline or other is None:
            continue
        history = [{"round": m["round"], "method": r.method, "seed": r.seed, name: m[key] - other[m["round"]]}
                   for m in r.history if m.get(key) is not None and other.get(m["round"]) is not None]
        if history:
            out.append(Run(history, r.config, r.name, r.folder, r.label, r.setting))
    return out


def rich_table(rows: list[dict]):
    """The terminal's view of summary.csv: the final accuracy with its interval, the rest as means."""
    from rich.table import Table

    table = Table(title="florana: mean over seeds [95% t interval]; full tables in summary.md")
    table.add_column("method", no_wrap=True, min_width=11)
    for name in ["setting", "seeds", "final acc", "best acc", "local acc", "agg. error", "floor", "MiB",
                 "rounds to target"]:
        table.add_column(name, justify="right")
    for row in rows:
        acc = "–" if row["global_accuracy"] is None else f"{row['global_accuracy']:.3f}" + (
            "" if row["global_accuracy_ci_low"] is None else
            f" [{row['global_accuracy_ci_low']:.3f}, {row['global_accuracy_ci_high']:.3f}]")
        to_target = cost_cell(row, "rounds_to_target", 0)
        table.add_row(row["method"], row["setting"], str(row["seeds"]), acc,
                      *[_num(row[k], d) for k, d in (("best_global_accuracy", 3), ("local_accuracy_mean", 3),
                                                     ("relative_error", 4), ("error_floor", 4), ("total_mib", 2))],
                      f"{to_target} (≥{row['target']:g}: {row['target_reached']}/{row['seeds']})")
    return table
