"""The test suite itself keeps the machine clean: its temp homes are gone when pytest exits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "two xdist workers"])
def test_no_temp_home_left_behind(tmp_path, workers):
    """`make test` runs in xdist workers: the controller makes a temp home too, and it must go as well."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers,
         "tests/test_config.py::test_toml_round_trip"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("florana-tests-")) == []
