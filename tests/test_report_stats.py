"""Statistics over seeds (report/stats.py), the summary tables built on them and the summary folder, on synthetic
histories: known values, SciPy where it is installed, and what each file holds."""

import csv
import io
import json
import math
import os
import shutil

import matplotlib.image
import numpy as np
import pytest

from florana.config import default_of
from florana.errors import FloranaError
from florana.report import stats, tables
from florana.report.provenance import git_commit, machine
from florana.report.summary import find_runs, slug, write_summary
from florana.report.tables import Run


# ---- stats ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                          (29, 2.0452), (1000, 1.9623)])
def test_t_quantile_matches_the_tables(df, expected):
    assert stats.t_quantile(0.95, df) == pytest.approx(expected, abs=1e-4)


def test_t_distribution_matches_scipy():
    sp = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 8, 17, 60, 301):
        for confidence in (0.8, 0.9, 0.95, 0.99):
            assert stats.t_quantile(confidence, df) == pytest.approx(sp.t.ppf(0.5 + confidence / 2, df), rel=1e-9)
        for t in (0.05, 0.7, 2.1, 9.0):
            assert stats.t_within(t, df) == pytest.approx(1 - 2 * sp.t.sf(t, df), abs=1e-12)
    with pytest.raises(ValueError):
        stats.t_within(1.0, 0)


def test_mean_ci_by_hand():
    est = stats.mean_ci([1.0, 2.0, 3.0])  # std 1, half-width t(0.975, 2)·1/√3 = 4.3027/1.7321 = 2.4841
    assert (est.n, est.mean, est.std) == (3, 2.0, 1.0)
    assert est.low == pytest.approx(2 - 2.48414, abs=1e-5) and est.high == pytest.approx(2 + 2.48414, abs=1e-5)
    assert stats.mean_ci([0.7]) == stats.Estimate(1, 0.7, None, None, None)  # one seed: no interval
    assert stats.mean_ci([]) == stats.Estimate(0, None, None, None, None)
    wide = stats.mean_ci([1.0, 2.0, 3.0], confidence=0.99)
    assert wide.high - wide.low > est.high - est.low


def test_mean_ci_matches_scipy():
    sp = pytest.importorskip("scipy.stats")
    values = [0.61, 0.66, 0.70, 0.64, 0.72]
    est = stats.mean_ci(values)
    low, high = sp.t.interval(0.95, len(values) - 1, loc=sp.tmean(values), scale=sp.sem(values))
    assert (est.low, est.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))


def test_bootstrap_ci():
    # two values: resampled means are 0, 0.5, 1 with probabilities ¼, ½, ¼; the 2.5% and 97.5% points are 0 and 1
    assert stats.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    values = [0.01, -0.02, 0.03, 0.015, 0.0, 0.02]
    a = stats.bootstrap_ci(values)
    assert a == stats.bootstrap_ci(values)  # fixed seed: reproducible
    assert stats.bootstrap_ci(values, resamples=50, seed=1) != stats.bootstrap_ci(values, resamples=50, seed=2)
    assert min(values) <= a[0] < sum(values) / len(values) < a[1] <= max(values)
    narrow = stats.bootstrap_ci(values, confidence=0.5)
    assert a[0] < narrow[0] < narrow[1] < a[1]
    assert stats.bootstrap_ci([0.3]) is None and stats.bootstrap_ci([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))
    # many values: the bootstrap interval of the mean approaches the t interval
    import numpy as np

    sample = np.random.default_rng(7).normal(0.5, 0.1, size=400).tolist()
    t, boot = stats.mean_ci(sample), stats.bootstrap_ci(sample)
    assert boot == (pytest.approx(t.low, abs=0.002), pytest.approx(t.high, abs=0.002))


def test_paired_diff():
    method, base = [0.70, 0.72, 0.69, 0.650], [0.68, 0.70, 0.70, 0.647]
    p = stats.paired_diff(method, base)  # differences +0.02, +0.02, −0.01, +0.003
    assert (p.n, p.wins, p.ties, p.losses) == (4, 2, 1, 1)
    assert p.diff.mean == pytest.approx(0.00825)
    assert p.diff.low < 0 < p.diff.high and p.bootstrap[0] < p.diff.mean < p.bootstrap[1]
    sp = pytest.importorskip("scipy.stats")
    assert p.p_value == pytest.approx(sp.ttest_rel(method, base).pvalue, rel=1e-9)
    # the tie band is |d| < tie: exactly +tie is a win, a hair below is a tie
    edge = stats.paired_diff([0.505, 0.5049], [0.5, 0.5], tie=0.005)
    assert (edge.wins, edge.ties, edge.losses) == (1, 1, 0)
    one = stats.paired_diff([0.8], [0.7])
    assert one.diff.low is None and one.p_value is None and one.bootstrap is None and one.wins == 1
    same = stats.paired_diff([0.8, 0.9], [0.8, 0.9])
    assert same.p_value == 1.0 and same.ties == 2
    # every pair 0.034 below (fedsvd's two seeds on the default): no spread, so no interval and no p-value, not p = 0
    level = stats.paired_diff([0.745, 0.749], [0.779, 0.783])
    assert level.diff.mean == pytest.approx(-0.034) and level.diff.std == 0.0 and level.losses == 2
    assert level.diff.low is None and level.diff.high is None and level.p_value is None and level.bootstrap is None
    assert tables.diff_cell(tables.paired_row("fedsvd", "alpha=0.5", "global_accuracy", "fedit", level)) \
        == "-0.034 (all 2 pairs)"
    # equal to rounding: 0.7 − 0.3 and 0.8 − 0.4 differ in the last bit, which a t test would read as p ≈ 1e-15
    assert stats.paired_diff([0.7, 0.8], [0.3, 0.4]).p_value is None
    assert stats.paired_diff([0.3, 0.4], [0.1 + 0.2, 0.4]).p_value == 1.0  # no difference, to rounding
    with pytest.raises(ValueError):
        stats.paired_diff([0.1, 0.2], [0.1])


def test_first_and_median_reached():
    assert stats.first_reached([None, 0.5, 0.71, 0.69, 0.8], 0.7) == 2
    assert stats.first_reached([0.5, 0.6], 0.7) is None
    assert stats.first_reached([0.7], 0.7) == 0  # reaching is ≥
    assert stats.median_reached([3, None, 5]) == 5  # None is never: an infinite cost
    assert stats.median_reached([3, None, None]) is None  # fewer than half reached
    assert stats.median_reached([2, None]) is None  # exactly half: the median is infinite
    assert stats.median_reached([2, 4]) == 3 and stats.median_reached([]) is None


# ---- tables -----------------------------------------------------------------------------------------------------
MIB = 2**20


def history(method, seed, accs, alpha=0.5, errors=None, floors=None, seconds=10.0, mib_per_round=2.0, fedit=None):
    """A synthetic metrics.jsonl: one record per round with the keys close_round writes."""
    out = []
    for i, acc in enumerate(accs):
        err = None if errors is None else errors[i]
        out.append({"round": i + 1, "method": method, "seed": seed, "alpha": alpha, "global_accuracy": acc,
                    "global_macro_f1": None if acc is None else acc - 0.1,
                    "local_accuracy_mean": 0.8, "local_global_gap": None if acc is None else 0.8 - acc,
                    "relative_error": err, "error_floor": None if floors is None else floors[i],
                    "fedit_error": None if fedit is None else fedit[i], "seconds": seconds, "norm_A": 1.0 + i + seed,
                    "cum_bytes_up": (i + 1) * mib_per_round * MIB / 2,
                    "cum_bytes_down": (i + 1) * mib_per_round * MIB / 2})
    return out


def test_run_numbers():
    h = history("florana", 0, [0.6, 0.72, 0.68, 0.75], errors=[0.3, 0.2, 0.1, 0.2], floors=[0.1] * 4,
                fedit=[0.4] * 4, seconds=5.0, mib_per_round=3.0)
    n = tables.run_numbers(h, target=0.7)
    assert n["global_accuracy"] == 0.75 and n["best_global_accuracy"] == 0.75 and n["best_round"] == 4
    assert n["mean_global_accuracy"] == pytest.approx((0.6 + 0.72 + 0.68 + 0.75) / 4)  # lags early: below final
    assert n["relative_error"] == pytest.approx(0.2) and n["fedit_error"] == pytest.approx(0.4)
    assert n["error_floor"] == pytest.approx(0.1)
    assert n["total_mib"] == pytest.approx(12.0) and n["seconds"] == pytest.approx(20.0)
    assert (n["rounds_to_target"], n["mib_to_target"], n["seconds_to_target"]) == (2, 6.0, 10.0)
    never = tables.run_numbers(h, target=0.9)
    assert never["rounds_to_target"] is None and never["mib_to_target"] is None and never["seconds_to_target"] is None
    # local's global accuracy exists at its last round only; the best round is then that one
    local = tables.run_numbers(history("local", 0, [None, None, 0.66]), target=0.6)
    assert local["best_global_accuracy"] == 0.66 and local["best_round"] == 3 and local["rounds_to_target"] == 3


def grid(alphas=(0.5,), seeds=(0, 1, 2), shift=None, config_extra=None):
    """fedit and florana runs over alphas × seeds: florana's final accuracy is fedit's + shift[seed]."""
    shift = shift or {0: 0.02, 1: 0.03, 2: -0.01}
    runs = []
    for alpha in alphas:
        for seed in seeds:
            base = 0.60 + 0.01 * seed
            for method, final in (("fedit", base), ("florana", base + shift[seed])):
                config = {"method": method, "seed": seed, "alpha": alpha, "rounds": 3, "lr": 0.002,
                          **(config_extra or {})}
                runs.append(Run(history(method, seed, [0.5, 0.55, final], alpha, errors=[0.2, 0.2, 0.2]),
                                config, name=f"{method}-alpha{alpha:g}-seed{seed}"))
    return runs


def test_summarize_rows_hold_the_statistics():
    runs = tables.label_runs(grid())
    rows = tables.summarize(runs, target=0.6)
    assert [(r["method"], r["setting"], r["seeds"]) for r in rows] == [("fedit", "alpha=0.5", 3),
                                                                        ("florana", "alpha=0.5", 3)]
    fedit = rows[0]
    est = stats.mean_ci([0.60, 0.61, 0.62])
    assert (fedit["global_accuracy"], fedit["global_accuracy_std"]) == (pytest.approx(0.61), pytest.approx(0.01))
    assert (fedit["global_accuracy_ci_low"], fedit["global_accuracy_ci_high"]) == (est.low, est.high)
    assert fedit["global_accuracy_n"] == 3 and fedit["seed_list"] == "0 1 2"
    # fedit reaches 0.6 at round 3 on every seed; the median cost is round 3, 6 MiB, 30 s
    assert (fedit["target_reached"], fedit["rounds_to_target_median"], fedit["mib_to_target_median"],
            fedit["seconds_to_target_median"]) == (3, 3, 6.0, 30.0)
    florana = tables.summarize(runs, target=0.62)[1]  # florana: 0.62, 0.64, 0.61 → 2 of 3 reach 0.62
    assert florana["target_reached"] == 2 and florana["rounds_to_target_median"] == 3
    assert tables.summarize(runs, target=0.63)[1]["rounds_to_target_median"] is None  # 1 of 3: not reached
    assert set(tables.SUMMARY_KEYS) <= set(rows[0])


def test_paired_by_seed_and_pooled():
    runs = tables.label_runs(grid(alphas=(0.1, 1.0)))
    runs.reverse()  # pairing follows (setting, seed), not the order runs come in
    pairs = tables.paired(runs)
    final = {p["setting"]: p for p in pairs if p["metric"] == "global_accuracy"}
    assert set(final) == {"alpha=0.1", "alpha=1", "all"}
    p = final["alpha=0.1"]
    assert p["method"] == "florana" and p["baseline"] == "fedit" and p["n"] == 3
    assert p["diff_mean"] == pytest.approx((0.02 + 0.03 - 0.01) / 3)
    assert (p["wins"], p["ties"], p["losses"]) == (2, 0, 1)
    expected = stats.paired_diff([0.62, 0.64, 0.61], [0.60, 0.61, 0.62])
    assert (p["t_ci_low"], p["t_ci_high"]) == (pytest.approx(expected.diff.low), pytest.approx(expected.diff.high))
    assert final["all"]["n"] == 6 and final["all"]["wins"] == 4
    # a seed fedit lacks is left out of the pairs, not paired with another seed
    partial = tables.label_runs([r for r in grid() if not (r.method == "fedit" and r.seed == 2)])
    assert [p["n"] for p in tables.paired(partial) if p["metric"] == "global_accuracy"] == [2]
    assert tables.paired(tables.label_runs([r for r in grid() if r.method == "florana"])) == []


def test_label_runs_settings_and_variants():
    runs = grid(alphas=(0.1, 1.0))
    tables.label_runs(runs)
    assert {r.setting for r in runs} == {"alpha=0.1", "alpha=1"}
    assert {r.label for r in runs} == {"fedit", "florana"}
    # another key that differs between runs is part of the setting; threads never is
    runs = grid(config_extra={"lr": 0.001}) + grid(config_extra={"threads": 8})
    tables.label_runs(runs)
    assert {r.setting for r in runs} == {"alpha=0.5, lr=0.001", "alpha=0.5, lr=0.002"}
    # local_steps is everyone's key, though 'local' is a method name (a bound, which has no options)
    runs = [*grid(seeds=(0,), config_extra={"local_steps": 5}), *grid(seeds=(0,), config_extra={"local_steps": 9})]
    for steps in (5, 9):
        runs.append(Run(history("local", 0, [0.6]), {**runs[0].config, "method": "local", "local_steps": steps}))
    for i, r in enumerate(runs):
        r.name = f"run{i}"
    tables.label_runs(runs)
    assert {(r.label, r.setting) for r in runs} == {(m, f"alpha=0.5, local_steps={k}")
                                                    for m in ("fedit", "florana", "local") for k in (5, 9)}
    # a config.toml written before a key existed holds its default
    old = grid(seeds=(0,))
    for r in old:
        r.config.pop("lr")
    runs = tables.label_runs(old + grid(seeds=(1,), config_extra={"lr": default_of("lr")}))
    assert {r.setting for r in runs} == {"alpha=0.5"}
    # a key named after a method labels that method's variants and stays out of the setting
    runs = grid(config_extra={"florana_sweeps": 5}) + [r for r in grid(config_extra={"florana_sweeps": 50})
                                                       if r.method == "florana"]
    for r in runs[-3:]:
        r.name += "-b"
    tables.label_runs(runs)
    assert {r.setting for r in runs} == {"alpha=0.5"}
    assert {r.label for r in runs} == {"fedit", "florana[sweeps=5]", "florana[sweeps=50]"}
    assert len([p for p in tables.paired(runs) if p["metric"] == "global_accuracy"]) == 2
    # ... also in a table without that method: FedIT runs made under two florana_prox defaults are one setting
    fedit = [r for r in grid(seeds=(0,), config_extra={"florana_prox": 0.0}) if r.method == "fedit"]
    fedit += [r for r in grid(seeds=(1,), config_extra={"florana_prox": 10.0}) if r.method == "fedit"]
    assert {r.setting for r in tables.label_runs(fedit)} == {"alpha=0.5"} and {r.label for r in fedit} == {"fedit"}
    # two runs of the same method, setting and seed: an error naming both
    with pytest.raises(FloranaError, match="two runs of fedit, alpha=0.5, seed 0"):
        tables.label_runs(grid() + grid()[:1])


def test_markdown_reads_as_documented():
    runs = tables.label_runs(grid())
    text = tables.to_markdown(tables.summarize(runs), tables.paired(runs), plots={"alpha=0.5": "plots/alpha0.5"})
    assert "## alpha=0.5" in text and "![accuracy](plots/alpha0.5/accuracy.png)" in text
    lo, hi = (f"{v:+.3f}" for v in (stats.paired_diff([0.62, 0.64, 0.61], [0.60, 0.61, 0.62]).diff.low,
                                   stats.paired_diff([0.62, 0.64, 0.61], [0.60, 0.61, 0.62]).diff.high))
    assert f"| florana | 3 | +0.013 [{lo}, {hi}] |" in text
    assert "| fedit | 3 | 3 | 0.610 ± 0.010 [" in text and "2/0/1" in text
    one = tables.label_runs(grid(seeds=(0,)))
    text = tables.to_markdown(tables.summarize(one), tables.paired(one))
    assert "| fedit | 1 | 3 | 0.600 (n=1) |" in text and "+0.020 (n=1)" in text 
    assert not any(" ± " in line for line in text.splitlines() if line.startswith("|"))
    alone = tables.label_runs([r for r in grid() if r.method == "florana"])
    assert "No paired comparison: no fedit runs" in tables.to_markdown(tables.summarize(alone), [])


def test_local_accuracy_stands_beside_its_own_majority_floor():
    """The quality table gives the clients' own-majority floor (local_majority_mean at the last round) beside their
    local accuracy, over seeds; a run that predates the floor counts as none ('–' where no run has it)."""
    runs = grid()
    for r in runs:
        if r.method == "florana":
            for m in r.history:
                m["local_majority_mean"] = 0.80 + 0.02 * r.seed
    rows = tables.summarize(tables.label_runs(runs))
    fedit, florana = rows
    assert fedit["local_majority_mean"] is None and fedit["local_majority_mean_n"] == 0
    assert florana["local_majority_mean"] == pytest.approx(0.82) and florana["local_majority_mean_n"] == 3
    text = tables.to_markdown(rows, [])
    head = next(line for line in text.splitlines() if line.startswith("| method | seeds"))
    assert "| local acc | own-majority floor |" in head
    assert "| 0.800 ± 0.000 [0.800, 0.800] | 0.820 ± 0.020 [" in text  # florana: local acc, then its floor
    assert "| 0.800 ± 0.000 [0.800, 0.800] | – |" in text  # fedit's runs have none
    assert "local_majority_mean" in tables.runs_csv(runs).splitlines()[0]


# ---- the summary folder -----------------------------------------------------------------------------------------
def write_runs(root, runs):
    for r in runs:
        folder = root / r.name
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in r.history))
        (folder / "config.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in r.config.items()))
    return root


def test_write_summary_files(tmp_path):
    root = write_runs(tmp_path / "sweep", grid(alphas=(0.1, 1.0)))
    out = tmp_path / "results"
    rows = write_summary(find_runs([root]), out, target=0.6)
    assert sorted(p.name for p in out.iterdir()) == ["histories", "paired.csv", "paired_rounds.csv", "plots",
                                                     "provenance.json", "rounds.csv", "run_configs", "runs.csv",
                                                     "summary.csv", "summary.md"]
    per_round = list(csv.DictReader(io.StringIO((out / "rounds.csv").read_text())))
    assert len(per_round) == 2 * 2 * 3  # methods × settings × rounds
    last = next(r for r in per_round if (r["method"], r["setting"], r["round"]) == ("fedit", "alpha=0.1", "3"))
    est = stats.mean_ci([0.60, 0.61, 0.62])
    assert float(last["global_accuracy"]) == pytest.approx(0.61) and last["seeds"] == "3"
    assert float(last["global_accuracy_ci_low"]) == pytest.approx(est.low, abs=1e-5)  # ROUND_DIGITS
    # a metric this code does not know (a later version's) comes along: norm_A = 3 + seed at round 3
    assert float(last["norm_A"]) == pytest.approx(4.0) and float(last["cum_mib"]) == pytest.approx(6.0)
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert len(summary) == len(rows) == 4 and list(summary[0]) == tables.SUMMARY_KEYS
    assert summary[0]["global_accuracy_ci_low"] and summary[0]["setting"] == "alpha=0.1"
    paired = list(csv.DictReader(io.StringIO((out / "paired.csv").read_text())))
    assert list(paired[0]) == tables.PAIRED_KEYS and {p["setting"] for p in paired} == {"alpha=0.1", "alpha=1", "all"}
    # an interval wherever the differences vary; none where every seed's is the same (here: the metrics grid() makes
    # equal for both methods)
    assert all(bool(p["bootstrap_ci_low"]) == bool(p["t_ci_low"]) == (float(p["diff_std"]) > 0) for p in paired)
    assert any(p["bootstrap_ci_low"] for p in paired)
    per_run = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert len(per_run) == 12 and list(per_run[0]) == tables.RUN_KEYS and "mean_global_accuracy" in per_run[0]
    for setting in ("alpha0.1", "alpha1"):
        assert sorted(p.name for p in (out / "plots" / setting).iterdir()) == [
            "accuracy.png", "accuracy_mib.png", "accuracy_vs_fedit.png", "bytes.png", "error.png"]
    # florana − fedit round by round, paired by seed: grid() makes florana's final accuracy fedit's + shift[seed]
    by_round = list(csv.DictReader(io.StringIO((out / "paired_rounds.csv").read_text())))
    assert {r["method"] for r in by_round} == {"florana"} and len(by_round) == 2 * 3  # settings × rounds
    assert list(by_round[0])[:4] == ["method", "setting", "round", "seeds"] and "cum_mib" not in by_round[0]
    fedit = {(r.setting, r.seed): r.history for r in tables.label_runs(find_runs([root])) if r.method == "fedit"}
    florana = {(r.setting, r.seed): r.history for r in tables.label_runs(find_runs([root])) if r.method == "florana"}
    for row in by_round:
        i = int(row["round"]) - 1
        diffs = [florana[k][i]["global_accuracy"] - fedit[k][i]["global_accuracy"] for k in fedit
                 if k[0] == row["setting"]]
        est = stats.mean_ci(diffs)
        assert row["seeds"] == "3" and float(row["global_accuracy_vs_fedit"]) == pytest.approx(est.mean, rel=1e-4)
        assert float(row["global_accuracy_vs_fedit_ci_low"]) == pytest.approx(est.low, rel=1e-4)  # ROUND_DIGITS
    assert "accuracy_vs_fedit.png" in (out / "summary.md").read_text()
    info = json.loads((out / "provenance.json").read_text())
    assert info["statistics"]["target"] == 0.6 and info["statistics"]["bootstrap"]["seed"] == 0
    assert set(info["machine"]) >= {"platform", "cpu", "cpu_count", "torch"} and len(info["runs"]) == 12
    entry = info["runs"][0]
    assert entry["config"] == "run_configs/fedit-alpha0.1-seed0.toml" and entry["seconds"] == pytest.approx(30.0)
    assert entry["sessions"] == [] and not entry["finished"]  # no sessions.jsonl, no global_adapter here
    assert (out / entry["config"]).read_text() == (root / "fedit-alpha0.1-seed0" / "config.toml").read_text()
    text = (out / "summary.md").read_text()
    assert "12 runs: fedit, florana; seeds 0, 1, 2" in text and "## All settings pooled" in text
    assert "0 of 12 runs recorded their sessions" in text
    # a second summary of fewer runs removes the config copies of the runs it no longer holds
    write_summary(find_runs([root / "fedit-alpha0.1-seed0", root / "florana-alpha0.1-seed0"]), out)
    assert sorted(p.name for p in (out / "run_configs").iterdir()) == ["fedit-alpha0.1-seed0.toml",
                                                                      "florana-alpha0.1-seed0.toml"]
    assert sorted(p.name for p in (out / "histories").iterdir()) == ["fedit-alpha0.1-seed0.jsonl",
                                                                    "florana-alpha0.1-seed0.jsonl"]


def test_the_per_round_tables_keep_round_digits_significant_digits(tmp_path):
    """rounds.csv and paired_rounds.csv hold a row per method, setting and round with three cells per metric: written
    at full repr (17 digits) a sweep's table passed 1 MiB, and at 7 digits the Rotten Tomatoes table of 45 groups
    came within 3% of it. Floats keep ROUND_DIGITS (5) significant digits, whole numbers (byte counts) stay exact,
    means of byte counts go to the unit (not 2.0859e+06), and a summary read back and written again gives the same
    text."""
    runs = grid(alphas=(0.1,))
    for r in runs:
        for m in r.history:
            m["global_accuracy"] += 1 / 3000  # 17 digits in repr
            m["cum_bytes_up"] = 123_456_789 * m["round"]  # 9 digits, whole
            m["bytes_down"] = 2_085_944 + (r.seed == 0)  # over seeds 0-2: 2085944.33…, 7 digits and a fraction
    out, again = tmp_path / "results", tmp_path / "again"
    write_summary(find_runs([write_runs(tmp_path / "sweep", runs)]), out, target=0.6)
    rows = list(csv.DictReader(io.StringIO((out / "rounds.csv").read_text())))
    diffs = list(csv.DictReader(io.StringIO((out / "paired_rounds.csv").read_text())))
    fractions = [v for row in rows + diffs for k, v in row.items() if k not in ("method", "setting") and "." in v]
    assert len(fractions) > 100 and all(len(v.lstrip("-").split("e")[0].replace(".", "").lstrip("0"))
                                        <= tables.ROUND_DIGITS for v in fractions)
    last = next(r for r in rows if (r["method"], r["round"]) == ("fedit", "3"))
    assert tables.ROUND_DIGITS == 5 and last["global_accuracy"] == "0.61033"  # 0.61 + 1/3000
    assert last["cum_bytes_up"] == str(3 * 123_456_789)
    assert last["bytes_down"] == "2085944" and "e" not in last["bytes_down_ci_low"] + last["bytes_down_ci_high"]
    write_summary(find_runs([out]), again, target=0.6)
    for name in ("rounds.csv", "paired_rounds.csv"):
        assert (again / name).read_text() == (out / name).read_text()


SUMMARY_TABLES = ("summary.csv", "paired.csv", "runs.csv", "rounds.csv", "paired_rounds.csv")


def test_a_summary_is_a_record_its_runs_are_read_back_from(tmp_path):
    """A summary keeps each run's config, history and sessions: summarising it again (on another machine, where the
    run folders are gone) gives the same tables, and its finished flags and sessions stand."""
    root = write_runs(tmp_path / "sweep", grid(alphas=(0.1, 1.0)))
    (root / "fedit-alpha0.1-seed0" / "global_adapter").mkdir()
    session = {"git": {"commit": "abc", "dirty": False}, "machine": {"cpu": "x", "cpus_usable": 2}}
    (root / "fedit-alpha0.1-seed0" / "sessions.jsonl").write_text(json.dumps(session) + "\n")
    first, again = tmp_path / "results", tmp_path / "elsewhere"
    write_summary(find_runs([root]), first, target=0.6)
    assert (first / "histories" / "fedit-alpha0.1-seed0.jsonl").read_text() == \
        (root / "fedit-alpha0.1-seed0" / "metrics.jsonl").read_text()
    shutil.rmtree(root)
    runs = find_runs([first])
    assert len(runs) == 12 and all(r.history and r.folder is None and r.summary == first for r in runs)
    write_summary(runs, again, target=0.6)
    for name in SUMMARY_TABLES:
        assert (again / name).read_text() == (first / name).read_text(), name
    assert sorted(p.name for p in (again / "plots" / "alpha0.1").iterdir()) == sorted(
        p.name for p in (first / "plots" / "alpha0.1").iterdir())
    entries = {e["name"]: e for e in json.loads((again / "provenance.json").read_text())["runs"]}
    assert entries["fedit-alpha0.1-seed0"]["finished"] and not entries["fedit-alpha0.1-seed1"]["finished"]
    assert entries["fedit-alpha0.1-seed0"]["sessions"] == [session]
    assert (again / "run_configs" / "florana-alpha1-seed2.toml").read_text() == \
        (first / "run_configs" / "florana-alpha1-seed2.toml").read_text()
    # summarised into itself, it stays whole
    write_summary(find_runs([first]), first, target=0.6)
    assert len(list((first / "histories").iterdir())) == len(list((first / "run_configs").iterdir())) == 12
    for name in SUMMARY_TABLES:
        assert (again / name).read_text() == (first / name).read_text(), name


def test_a_summary_made_before_histories_still_gives_every_table(tmp_path):
    """A summary written before summaries kept histories has each run's numbers in runs.csv: summarised again, the
    per-run statistics and the paired differences come out the same; a method's runs in a setting that are the very
    runs the summary grouped keep the per-round rows and plots it recorded, other groups of them have no curves and
    the header says so; a run folder of the same run, where there is one, stands in for the numbers."""
    root = write_runs(tmp_path / "sweep", grid(alphas=(0.1, 1.0)))
    old, again = tmp_path / "results", tmp_path / "again"
    write_summary(find_runs([root]), old, target=0.6)
    shutil.rmtree(old / "histories")  # what summaries looked like before
    runs = find_runs([old])
    assert len(runs) == 12 and not any(r.history for r in runs) and all(r.numbers for r in runs)
    write_summary(runs, again, target=0.6)
    assert (again / "paired.csv").read_text() == (old / "paired.csv").read_text()
    kept = [k for k in tables.SUMMARY_KEYS if not k.startswith("local_global_gap")]  # not in an old runs.csv
    before, after = (list(csv.DictReader(io.StringIO((f / "summary.csv").read_text()))) for f in (old, again))
    assert [{k: r[k] for k in kept} for r in after] == [{k: r[k] for k in kept} for r in before]
    for name in ("rounds.csv", "paired_rounds.csv"):  # the curves survive the histories
        assert (again / name).read_text() == (old / name).read_text()
    plots = sorted(p.relative_to(old) for p in (old / "plots").rglob("*.png"))
    assert len(plots) == 2 * 5 and plots == sorted(p.relative_to(again) for p in (again / "plots").rglob("*.png"))
    for p in plots:  # drawn from the recorded rows, ROUND_DIGITS of them: at most two shades of antialiasing apart
        a, b = (matplotlib.image.imread(f / p) for f in (old, again))
        assert a.shape == b.shape and np.abs(a - b).max() < 2.5 / 255, p
    assert not list((again / "histories").iterdir())
    assert "12 of the runs come with only the numbers runs.csv kept" in (again / "summary.md").read_text()
    assert "(4 such groups)" in (again / "summary.md").read_text()
    # seed 2 left out: no group is the one recorded, so none has curves
    part = tmp_path / "part"
    write_summary(find_runs([old], only="seed[01]$"), part, target=0.6)
    assert (part / "rounds.csv").read_text() == "method,setting,round,seeds\n" and not (part / "plots").exists()
    assert "(0 such groups)" in (part / "summary.md").read_text()
    # a run folder for one of fedit's runs: fedit's curves at alpha 0.1 are that run's; florana's there keep their
    # recorded rows, but not their differences from fedit, whose group is no longer the recorded one
    mixed = tmp_path / "mixed"
    write_summary(find_runs([old, root / "fedit-alpha0.1-seed0"]), mixed, target=0.6)
    rows = list(csv.DictReader(io.StringIO((mixed / "rounds.csv").read_text())))
    assert {(r["method"], r["setting"], r["seeds"]) for r in rows} == {
        ("fedit", "alpha=0.1", "1"), ("florana", "alpha=0.1", "3"), ("fedit", "alpha=1", "3"),
        ("florana", "alpha=1", "3")}
    diffs = list(csv.DictReader(io.StringIO((mixed / "paired_rounds.csv").read_text())))
    assert {(r["method"], r["setting"]) for r in diffs} == {("florana", "alpha=1")}
    with pytest.raises(FloranaError, match=r"run fedit-alpha0\.1-seed0 has only the numbers.*--target 0\.6"):
        write_summary(find_runs([old]), tmp_path / "other", target=0.7)
    both = find_runs([old, root / "fedit-alpha0.1-seed0"])
    assert len(both) == 12 and [r.folder for r in both if r.name == "fedit-alpha0.1-seed0"] == \
        [root / "fedit-alpha0.1-seed0"]


def test_find_runs_takes_only_the_names_asked_for(tmp_path):
    root = write_runs(tmp_path / "sweep", grid())
    assert {r.method for r in find_runs([root], only="^fedit-")} == {"fedit"}
    assert len(find_runs([root], only="seed[01]$")) == 4
    with pytest.raises(FloranaError, match=r"--runs '\(': not a regular expression"):
        find_runs([root], only="(")
    with pytest.raises(FloranaError, match="no metrics.jsonl in it or its sub-folders, and no provenance.json"):
        find_runs([tmp_path])


def test_a_summary_keeps_matplotlib_s_cache_out_of_its_plots(tmp_path, monkeypatch):
    """Without a user's MPLCONFIGDIR, matplotlib's cache goes to the summary's top (.mpl, ignored by git and known
    to the folder checks), never into plots/, which results/ commits."""
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    root = write_runs(tmp_path / "sweep", grid())
    write_summary(find_runs([root]), tmp_path / "results")
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "results" / ".mpl")


def test_find_runs_names_twins_by_their_parent(tmp_path):
    a = write_runs(tmp_path / "a", grid(seeds=(0,)))
    b = write_runs(tmp_path / "b", grid(seeds=(0,), config_extra={"lr": 0.01}))
    runs = find_runs([a, b])
    assert sorted(r.name for r in runs) == ["a-fedit-alpha0.5-seed0", "a-florana-alpha0.5-seed0",
                                            "b-fedit-alpha0.5-seed0", "b-florana-alpha0.5-seed0"]
    (tmp_path / "a" / "empty").mkdir()
    (tmp_path / "a" / "empty" / "metrics.jsonl").write_text("")
    assert len(find_runs([a])) == 2  # a run with no finished round is left out
    with pytest.raises(FloranaError, match="no metrics.jsonl"):
        find_runs([tmp_path / "a" / "nothing"])


def test_find_runs_orders_methods_as_all_does_then_alpha_and_seed(tmp_path):
    root = write_runs(tmp_path / "sweep", grid(alphas=(10.0, 2.0), seeds=(10, 9), shift={9: 0.01, 10: 0.02}))
    names = [r.name for r in find_runs([root])]
    assert names == [f"{m}-alpha{a}-seed{s}" for m in ("fedit", "florana") for a in (2, 10) for s in (9, 10)]


def test_slug():
    assert slug("alpha=0.5") == "alpha0.5" and slug("alpha=0.5, lr=0.001") == "alpha0.5-lr0.001"
    assert slug("alpha=1, dataset=/x/y.csv") == "alpha1-dataset_x_y.csv"


def test_provenance(tmp_path):
    here = git_commit()
    assert here["commit"] == "unknown" or (len(here["commit"]) == 40 and isinstance(here["dirty"], bool))
    assert git_commit(tmp_path) == {"commit": "unknown", "dirty": None}  # not a git checkout
    info = machine()
    assert info["cpu_count"] >= 1 and info["torch"] and math.isfinite(info.get("memory_gib", 1.0))


def test_plot_bands_stay_within_each_metrics_range():
    """With two seeds a t interval is mean ± 12.7 std: an accuracy band reached 1.8 and −0.6 in a committed plot.
    Bands are clipped to where the metric can lie; the mean is untouched."""
    from florana.report.plots import curve

    runs = [[{"round": 1, "global_accuracy": 0.55, "relative_error": 0.02}],
            [{"round": 1, "global_accuracy": 0.95, "relative_error": 0.30}]]
    (_, mean, low, high), = curve(runs, "global_accuracy")
    assert mean == pytest.approx(0.75) and low == 0.0 and high == 1.0
    (_, mean, low, high), = curve(runs, "relative_error")
    assert mean == pytest.approx(0.16) and low == 0.0 and high > 0.30  # no ceiling on an error


def test_a_recorded_line_is_the_curve_of_its_runs():
    """Recorded rows give the points curve() gives for the histories behind them: the rounds every run had, the
    band clipped; a metric that only one of two runs recorded (its interval is missing) gives no point, as in curve()."""
    from florana.report.plots import Recorded, curve

    accuracy = [[0.55, 0.6], [0.95, 0.7], [0.75]]  # the third run did one round
    histories = [[{"round": r + 1, "method": "fedit", "seed": i, "global_accuracy": a} for r, a in enumerate(h)]
                 for i, h in enumerate(accuracy)]
    histories[0][0]["global_logit_spread"] = 0.2
    runs = [Run(h, {"method": "fedit", "seed": i, "alpha": 0.5}, name=f"r{i}") for i, h in enumerate(histories)]
    rows, _ = tables.round_rows(tables.label_runs(runs))
    line = Recorded(rows)
    assert line.n == 3
    assert line.curve("global_accuracy") == curve(histories, "global_accuracy")
    assert len(line.curve("global_accuracy")) == 1 and line.curve("global_accuracy")[0][3] == 1.0  # clipped
    assert curve(histories, "global_logit_spread") == [] and line.curve("global_logit_spread") == []
    one = Recorded(tables.round_rows(tables.label_runs(runs[:1]))[0])
    assert one.curve("global_logit_spread") == curve(histories[:1], "global_logit_spread") == [(1, 0.2, None, None)]
