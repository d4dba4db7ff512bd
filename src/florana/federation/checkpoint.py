"""Per-round checkpoints, each written atomically (a temporary folder renamed into place) and flushed to the disk, so a
run killed at any moment, kill -9 and a crash of the machine included, resumes from its last complete round; only
the newest few are kept. Tensors in safetensors, the rest in JSON."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from florana.errors import FloranaError
from florana.lora.peft_io import atomic_directory, fsync_path

ROUND_DIR = re.compile(r"^round-(\d{4,})$")
CHECKPOINT_FILES = ("state.safetensors", "state.json")


def save_checkpoint(run_dir: Path, round_: int, tensors: dict[str, Tensor], meta: dict) -> Path:
    target = run_dir / "checkpoints" / f"round-{round_:04d}"
    with atomic_directory(target, CHECKPOINT_FILES) as tmp:
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta))
    return target


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, folder) of every checkpoint in run_dir, oldest first."""
    folders = (Path(run_dir) / "checkpoints").glob("round-*")
    return sorted((int(m.group(1)), p) for p in folders if (m := ROUND_DIR.match(p.name)))


def latest_round(run_dir: Path) -> int:
    """The last round with a checkpoint (0 if none): the rounds done."""
    found = _checkpoints(run_dir)
    return found[-1][0] if found else 0


def latest_checkpoint(run_dir: Path) -> tuple[int, dict[str, Tensor], dict] | None:
    found = _checkpoints(run_dir)
    if not found:
        return None
    round_, path = found[-1]
    return round_, *_read(path)


def checkpoint_at(run_dir: Path, round_: int) -> tuple[dict[str, Tensor], dict]:
    """The state after `round_`, from the checkpoint the run kept of it (keep_checkpoints says how many it keeps)."""
    kept = dict(_checkpoints(run_dir))
    if round_ not in kept:
        have = ", ".join(map(str, kept)) or "none"
        raise FloranaError(f"{run_dir}: no checkpoint of round {round_} (kept: {have}; keep_checkpoints keeps more)")
    return _read(kept[round_])


def _read(path: Path) -> tuple[dict[str, Tensor], dict]:
    try:
        return load_file(path / "state.safetensors"), json.loads((path / "state.json").read_text())
    except Exception as e:  # a checkpoint is renamed into place only when complete; this is outside damage
        raise FloranaError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (call it once the newest is in place): their files, then
    their folders (one holding a file florana did not write stays)."""
    for _, path in _checkpoints(run_dir)[:-keep]:
        for name in CHECKPOINT_FILES:
            (path / name).unlink(missing_ok=True)
        try:
            path.rmdir()
        except OSError:
            pass


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step that survives a crash of the process or of the machine: the whole old
    file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
