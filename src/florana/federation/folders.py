"""Which folders `run`, `compare` and `report` may write into: new or empty ones, and florana's own run and
compare folders. Anything else holds someone's files and is refused, so no command overwrites or deletes a
file florana did not write."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from florana.errors import FloranaError, listing
from florana.federation.checkpoint import CHECKPOINT_FILES
from florana.lora.peft_io import ADAPTER_FILES
from florana.report.plots import PANELS
from florana.report.provenance import SESSIONS
from florana.report.summary import SUMMARY_FILES, SUMMARY_FOLDERS

LOCK = ".lock"  # held (flock) by the process running the run in this folder
# what a run writes at its top level (.mpl: matplotlib's cache; .flower: the loopback script's FLWR_HOME and logs)
SUMMARY_ENTRIES = frozenset({*SUMMARY_FILES, *SUMMARY_FOLDERS, ".mpl"})
RUN_ENTRIES = frozenset({"config.toml", "partition.json", "metrics.jsonl", "run.log", "checkpoints",
                         "global_adapter", SESSIONS, ".mpl", ".flower", LOCK, *SUMMARY_ENTRIES})
HIDDEN_ENTRIES = frozenset({".mpl", ".flower", LOCK})
# every file a run writes, wherever in its folder
RUN_FILES = frozenset(RUN_ENTRIES | set(CHECKPOINT_FILES) | set(ADAPTER_FILES) | {p[0] for p in PANELS})


def is_ours(name: str, names: frozenset[str]) -> bool:
    """`name` is one of `names`, or a temporary of an atomic write of one ('.metrics.jsonl.tmp42')."""
    return name in names or any(name.startswith(f".{n}.") for n in names)


def foreign_entries(folder: Path, names: frozenset[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not is_ours(p.name, names))


def holds_run(folder: Path) -> bool:
    """A run has started here: there are rounds to resume or a metrics file."""
    return (folder / "metrics.jsonl").exists() or (folder / "checkpoints").exists()


def run_folder_strays(folder: Path) -> list[str]:
    """The entries that keep `folder` from being a run's folder: none in a run's (whatever else it holds), nor in
    what a run that failed before its first round left (its log and run files), nor where only the hidden
    folders florana's tools make first are (the loopback script's .flower)."""
    if holds_run(folder):
        return []
    return foreign_entries(folder, RUN_ENTRIES if (folder / "run.log").is_file() else HIDDEN_ENTRIES)


def is_run_folder(folder: Path) -> bool:
    return folder.is_dir() and not run_folder_strays(folder)


def is_compare_folder(folder: Path) -> bool:
    """Nothing but compare's summaries and run folders (an empty folder is one)."""
    return folder.is_dir() and all(is_ours(p.name, SUMMARY_ENTRIES) or is_run_folder(p) for p in folder.iterdir())


def _existing_folder(path: Path) -> bool:
    """False where nothing is at `path`; True for a folder; an error for anything else."""
    if not os.path.lexists(path):
        return False
    if not path.is_dir():
        raise FloranaError(f"{path}: exists and is not a folder")
    return True


def _refusal(folder: Path, names: list[str], what: str) -> FloranaError:
    return FloranaError(f"{folder}: holds files that are not {what} ({listing(names)}); choose a new or empty folder")


def check_run_folder(run_dir: Path) -> None:
    """A new run may go into a new or empty folder, or one that a run left before its first round."""
    if not _existing_folder(run_dir):
        return
    if holds_run(run_dir):
        raise FloranaError(f"{run_dir}: already holds a run; use --resume to continue it or choose another --out")
    if strays := run_folder_strays(run_dir):
        raise _refusal(run_dir, strays, "a florana run's")


def check_compare_folder(out: Path) -> None:
    if _existing_folder(out) and not is_compare_folder(out):
        raise _refusal(out, sorted(p.name for p in out.iterdir() if not is_ours(p.name, SUMMARY_ENTRIES)
                                   and not is_run_folder(p)), "florana compare's")


def check_report_folder(out: Path) -> None:
    """report writes summary.md, summary.csv and plots/ into a run or compare folder, or a new or empty one."""
    if _existing_folder(out) and not (is_run_folder(out) or is_compare_folder(out)):
        raise _refusal(out, foreign_entries(out, SUMMARY_ENTRIES), "a florana run's or compare's")


class RunInUse(FloranaError):
    """Another process is running the run in this folder."""


@contextmanager
def holding(run_dir: Path, new: bool = False):
    """Hold run_dir for this process while it runs the run there: another `run`, `compare` or Flower server on the
    same folder stops with RunInUse naming the holder, instead of both writing its checkpoints and metrics. An OS
    file lock (flock) on run_dir/.lock, so it goes with the process, however that ends (kill -9 included). For a
    `new` run the folder is checked first (check_run_folder), so a folder of someone else's files gets no lock file."""
    if new:
        check_run_folder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "a process"
        os.close(fd)
        raise RunInUse(f"{run_dir}: in use by {holder}, which is running this run; wait for it or stop it") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    try:
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with the next holder)


def remove_run(run_dir: Path) -> None:
    """Delete a run: the files it writes (by name, anywhere in its folder), matplotlib's cache, then every folder
    left empty. A file florana did not write stays, and so does the folder holding it."""
    shutil.rmtree(run_dir / ".mpl", ignore_errors=True)
    for folder, _, files in os.walk(run_dir, topdown=False):
        for name in files:
            if is_ours(name, RUN_FILES):
                os.unlink(os.path.join(folder, name))
        try:
            os.rmdir(folder)
        except OSError:  # not empty: someone else's file is in it
            pass


def check_export_folder(out: Path, run_dir: Path, flag: str) -> None:
    """`florana export` writes into a new or empty folder outside the run's (whose files a later --force compare
    may delete by name), never over anyone's files, a previous export's included."""
    here, there = Path(out).resolve(), Path(run_dir).resolve()
    if here == there or there in here.parents or here in there.parents:
        raise FloranaError(f"{flag} {out} overlaps the run folder {run_dir}; choose a folder outside it")
    if _existing_folder(Path(out)) and (names := sorted(p.name for p in Path(out).iterdir())):
        raise FloranaError(f"{flag} {out}: holds files ({listing(names)}); export writes into a new or empty folder "
                           "only")
