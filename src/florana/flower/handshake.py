"""What server and nodes check of each other before round 1: software versions and a pinned base model's hash.

A node's hello (its answer to the server's query) carries the versions of florana, torch and transformers it runs
and, when its node config pins a local model folder (`model-path`), that folder's content hash. The server compares
both with its own: a version mismatch is a warning naming the node (an error with strict_versions = true), a hash
mismatch an error naming the node. Pure functions; the Flower messages are the server's and the ClientApp's.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from florana.errors import FloranaError

PACKAGES = ("florana", "torch", "transformers")
# what makes a model: its architecture (config.json) and weights; the tokenizer is not hashed
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
CHUNK = 1 << 24


def versions() -> dict[str, str]:
    """The installed versions of the packages a federation's two sides must agree on."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "none"
    return out


def version_problem(node: int, mine: dict[str, str], theirs: dict[str, str]) -> str | None:
    """Why a node's versions differ from the server's (naming the node and each package), or None."""
    diff = [f"{p} {theirs.get(p, 'unknown')} (server {mine[p]})" for p in PACKAGES if theirs.get(p) != mine[p]]
    return f"node {node} runs {', '.join(diff)}" if diff else None


def model_files(folder: Path) -> list[Path]:
    """The files a model's hash covers: config.json and every weight file, in a fixed order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and
                   (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)))
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
        raise FloranaError(f"{folder}: no model weights (*.safetensors, *.bin, *.gguf) to hash")
    return files


def model_hash(folder: str | Path) -> str:
    """SHA-256 over a model folder's config.json and weight files (each file's path relative to the folder, then
    its bytes): two copies of the same checkpoint hash alike wherever they lie."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FloranaError(f"{folder}: not a model folder")
    h = hashlib.sha256()
    for path in model_files(folder):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def base_model_folder(model: str) -> Path | None:
    """The local folder of a run's base model: the offline aliases' package folders, a local folder, or a hub
    model already in the local cache; None when there is none on this machine."""
    from florana.train.model import resolve_model

    path = Path(resolve_model(model)[0])
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached, or not a hub name: the server cannot vouch for it
        return None


def hash_problem(node: int, server_hash: str | None, node_hash: str, model: str) -> str | None:
    """Why a node's pinned model does not match the server's base model (naming the node), or None."""
    if server_hash is None:
        return (f"node {node} pins its base model (model-path), but the server has no local copy of {model!r} to "
                "compare it with")
    if node_hash != server_hash:
        return (f"node {node}: its model-path does not match the run's base model {model!r} (content hash "
                f"{node_hash[:12]}…, the server's {server_hash[:12]}…)")
    return None
