"""The pilot that chose `make demo`'s defaults: its chosen candidate is what RunConfig defaults to, and its table
says which runs stopped early."""

import importlib.util
import json
from pathlib import Path

from florana.config import RunConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pilot_defaults.py"


def pilot():
    spec = importlib.util.spec_from_file_location("pilot_defaults", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_chosen_candidate_is_the_default():
    p = pilot()
    chosen = p.CANDIDATES[p.CHOSEN]
    assert {k: getattr(RunConfig(), k) for k in chosen} == chosen


def test_table_marks_unfinished_runs(tmp_path):
    p = pilot()
    name = p.CHOSEN
    rounds = p.CANDIDATES[name]["rounds"]
    for method, done in (("fedit", rounds), ("florana", 2)):
        folder = tmp_path / name / method
        folder.mkdir(parents=True)
        rows = [{"round": i + 1, "global_accuracy": 0.5 + i / 100, "local_accuracy_mean": 0.8, "global_loss": 0.6,
                 "seconds": 10.0} for i in range(done)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = p.table(tmp_path, [name], ["fedit", "florana", "svd"]).splitlines()
    assert len(lines) == 4  # header, rule, fedit, florana; svd never ran
    assert f"| {rounds}/{rounds} | {0.5 + (rounds - 1) / 100:.3f} |" in lines[2]
    assert f"| 2/{rounds} (stopped) | 0.510 |" in lines[3]
    assert p.finished(tmp_path, name, "fedit") is not None and p.finished(tmp_path, name, "florana") is None
