"""Where results came from: the git commit of the florana source that ran and the machine it ran on, recorded by
each run as it starts or resumes (sessions.jsonl) and by each summary (provenance.json)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

SESSIONS = "sessions.jsonl"


def git_commit(source: Path | None = None) -> dict:
    """The commit of the git checkout that holds florana's source (and whether tracked files differ from it);
    'unknown' for an installed package or where git is missing."""
    source = Path(source or Path(__file__).resolve().parents[1])
    unknown = {"commit": "unknown", "dirty": None}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # florana's own files are tracked here
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return unknown


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """The machine this process runs on: OS, CPU model and counts, memory, Python, torch and any GPUs (when torch is
    already imported; never imported here). No host name."""
    info = {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "torch": _version("torch"), "florana": _version("florana")}
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def record_session(run_dir: Path, first_round: int, precision: str) -> None:
    """Append to run_dir/sessions.jsonl that a session of the run starts at `first_round`, when, from which commit,
    on which machine and in which precision (a run resumed elsewhere has one line per machine: the precision follows
    the machine's hardware)."""
    from florana.federation.checkpoint import write_text_atomic

    path = Path(run_dir) / SESSIONS
    old = path.read_text() if path.is_file() else ""
    line = json.dumps({"started": now(), "first_round": first_round, "git": git_commit(), "machine": machine(),
                       "precision": precision})
    write_text_atomic(path, old + line + "\n")


def read_sessions(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / SESSIONS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
