"""Read and write PEFT adapter directories (adapter_config.json + adapter_model.safetensors): JSON and
safetensors only, never pickle; writes are atomic (temporary folder, then rename) and touch only florana's files."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Collection, Sequence
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from florana.errors import FloranaError, listing
from florana.lora.adapter import EMB_A, EMB_B, LORA_A, LORA_B, LoraAdapter, LoraModule, base_layout, model_path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_UPDATE_FILE = "base_update.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, BASE_UPDATE_FILE)  # everything florana writes into an adapter folder


def load_adapter(directory: str | Path) -> LoraAdapter:
    """Load a PEFT LoRA adapter directory, checking that it is one and that its factors pair up."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise FloranaError(f"{directory}: not a directory")
    if not config_path.is_file() or not weights_path.is_file():
        raise FloranaError(f"{directory}: not a PEFT adapter directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FloranaError(f"{config_path}: not valid JSON ({e})") from None
    problem = config_problem(config)
    if problem:
        raise FloranaError(f"{config_path}: {problem}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise FloranaError(f"{weights_path}: unreadable safetensors file ({e})") from None
    return adapter_from_state_dict(config, tensors, source=str(directory))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _pattern_problem(patterns, key: str, valid, what: str) -> str | None:
    """PEFT's rank_pattern/alpha_pattern: a dict from module regexes to values."""
    if patterns is None:
        return None
    if not isinstance(patterns, dict):
        return f"{key} should be an object of module patterns, got {patterns!r}"
    for pattern, value in patterns.items():
        try:
            re.compile(pattern)
        except re.error as e:
            return f"{key}: {pattern!r} is not a regular expression ({e})"
        if not valid(value):
            return f"{key}[{pattern!r}] should be {what}, got {value!r}"
    return None


def config_problem(config) -> str | None:
    """What is wrong with an adapter_config.json's content for florana (the fields it reads), or None."""
    if not isinstance(config, dict):
        return f"not a LoRA adapter config (a JSON {type(config).__name__}, not an object)"
    if config.get("peft_type", "LORA") != "LORA":
        return f"not a LoRA adapter config (peft_type={config.get('peft_type')!r})"
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            return f"{key} should be true or false, got {config[key]!r}"
    if config.get("use_dora"):
        return "DoRA adapters are not supported (use_dora=true)"
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        return f"lora_alpha should be a number, got {config['lora_alpha']!r}"
    if "r" in config and not _is_int(config["r"]):
        return f"r should be a positive integer, got {config['r']!r}"
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        return f"target_modules should be a list of names or a regular expression, got {targets!r}"
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        return f"base_model_name_or_path should be a string, got {base!r}"
    return (_pattern_problem(config.get("alpha_pattern"), "alpha_pattern", _is_number, "a number")
            or _pattern_problem(config.get("rank_pattern"), "rank_pattern", _is_int, "a positive integer"))


def adapter_from_state_dict(config: dict, tensors: dict[str, Tensor], source: str) -> LoraAdapter:
    """Split a PEFT state dict into LoRA factor pairs and other tensors; `source` names it in errors."""
    modules: dict[str, LoraModule] = {}
    extra: dict[str, Tensor] = {}
    pairs = ((LORA_A, LORA_B, False), (EMB_A, EMB_B, True))
    for key, t in tensors.items():
        for a_suffix, b_suffix, emb in pairs:
            if key.endswith(a_suffix) or key.endswith(b_suffix):
                is_a = key.endswith(a_suffix)
                name = key[: -len(a_suffix if is_a else b_suffix)]
                other = name + (b_suffix if is_a else a_suffix)
                if other not in tensors:
                    raise FloranaError(f"{source}: module {name}: has {key} but no {other}")
                if is_a:
                    A, B = t, tensors[other]
                    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                        raise FloranaError(
                            f"{source}: module {name}: factors of shapes A {tuple(A.shape)}, B {tuple(B.shape)} "
                            "are not a 2-D LoRA pair (conv LoRA is not supported)"
                        )
                    modules[name] = LoraModule(A=A, B=B, embedding=emb)
                break
        else:
            extra[key] = t
    if not modules:
        raise FloranaError(f"{source}: holds no LoRA factors")
    return LoraAdapter(config=config, modules=dict(sorted(modules.items())), extra=dict(sorted(extra.items())))


def _new_sibling(target: Path) -> Path:
    """An empty hidden folder next to `target`, with the permissions a plain mkdir gives (mkdtemp's are 0700)."""
    while True:
        folder = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's list of entries, to the disk: a rename survives a crash of the machine, not only
    of the process, only when what it moves was flushed before and the folder it lands in after. Windows cannot
    open a folder for this: skipped there."""
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str | Path, owned: Collection[str] | None = ADAPTER_FILES):
    """Yield a temporary sibling folder to write some of the `owned` files into. On success a new `target` is that
    folder, renamed into place in one step; an existing one receives each file by an atomic replace and loses the
    owned files not written this time (a stale base_update.safetensors), while every other file in it stays.
    owned=None: any files (a saved transformers model), into a new or empty `target` only, which the folder
    replaces in one step. On error the temporary folder vanishes and `target` is untouched. Every file is on the
    disk before it is renamed into place, so what it writes survives a crash of the machine too."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(target)
    try:
        yield tmp
        written = {p.name for p in tmp.iterdir()}
        if owned is not None and written - set(owned):
            raise ValueError(f"atomic_directory({target}): wrote {sorted(written - set(owned))}, not owned files")
        file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666  # the umask's, as mkdir applied it to tmp
        for name in written:
            if (tmp / name).is_file():
                os.chmod(tmp / name, file_mode)  # safetensors creates its files 0600
        for path in [*tmp.rglob("*"), tmp]:  # a saved model may hold subfolders
            fsync_path(path)
        if owned is None and os.path.lexists(target):
            target.rmdir()  # fails, keeping it, unless it is an empty folder
        if not target.exists():
            os.rename(tmp, target)
            fsync_path(target.parent)
            return
        for name in set(owned) - written:
            (target / name).unlink(missing_ok=True)
        for name in sorted(written):
            os.replace(tmp / name, target / name)
        fsync_path(target)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse an output folder that would cost data: one that is, holds or lies inside an input folder, a file, a
    non-empty folder that is not an adapter, or an adapter folder without `force` (which replaces only florana's
    files in it)."""
    here = Path(out).resolve()
    for d in inputs:
        there = Path(d).resolve()
        if here == there or there in here.parents or here in there.parents:
            raise FloranaError(f"--out {out} overlaps the input adapter folder {d}; choose another folder")
    if not os.path.lexists(out):
        return
    if not Path(out).is_dir():
        raise FloranaError(f"--out {out}: exists and is not a folder")
    entries = sorted(p.name for p in Path(out).iterdir())
    if not entries:
        return
    if not (Path(out) / CONFIG_FILE).is_file():
        raise FloranaError(f"--out {out}: holds files and is not an adapter folder ({listing(entries)}); choose a "
                           "new or empty folder")
    if not force:
        raise FloranaError(f"--out {out}: already holds an adapter; pass --force to replace its "
                           f"{', '.join(ADAPTER_FILES)} (its other files are kept)")


def write_adapter_files(adapter: LoraAdapter, directory: Path) -> None:
    """Write the two PEFT files into an existing folder."""
    (directory / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, directory / WEIGHTS_FILE,
              metadata={"format": "pt"})


def save_adapter(adapter: LoraAdapter, directory: str | Path, base_update: dict[str, Tensor] | None = None) -> None:
    """Write `adapter` as a PEFT directory, with base_update.safetensors when there is one, atomically."""
    with atomic_directory(directory) as tmp:
        write_adapter_files(adapter, tmp)
        if base_update:
            save_base_update(base_update, adapter, tmp / BASE_UPDATE_FILE)


def save_base_update(update: dict[str, Tensor], adapter: LoraAdapter, path: str | Path) -> None:
    """Write dense updates ΔW (d×k, keyed by module) as '<module path in the model>.weight' in the layout of that
    base weight (transposed for embeddings and fan_in_fan_out), so that adding them to the base is all it takes."""
    tensors = {model_path(name) + ".weight": base_layout(t, adapter.modules[name], adapter.config).contiguous()
               for name, t in update.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
