"""Read and write PEFT adapter directories (adapter_config.json + adapter_model.safetensors): JSON and
safetensors only, never pickle; writes are atomic (temporary folder, then rename)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from florana.errors import FloranaError
from florana.lora.adapter import EMB_A, EMB_B, LORA_A, LORA_B, LoraAdapter, LoraModule, base_layout, model_path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_UPDATE_FILE = "base_update.safetensors"


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
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise FloranaError(f"{config_path}: not a LoRA adapter config (peft_type={config.get('peft_type')!r})")
    if config.get("use_dora"):
        raise FloranaError(f"{config_path}: DoRA adapters are not supported (use_dora=true)")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise FloranaError(f"{weights_path}: unreadable safetensors file ({e})") from None
    return adapter_from_state_dict(config, tensors, source=str(directory))


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


@contextmanager
def atomic_directory(target: str | Path):
    """Yield a temporary sibling folder; on success it replaces `target` in one rename, on error it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_adapter_files(adapter: LoraAdapter, directory: Path) -> None:
    """Write the two PEFT files into an existing folder."""
    (directory / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, directory / WEIGHTS_FILE,
              metadata={"format": "pt"})


def save_adapter(adapter: LoraAdapter, directory: str | Path) -> None:
    """Write `adapter` as a PEFT directory, atomically."""
    with atomic_directory(directory) as tmp:
        write_adapter_files(adapter, tmp)


def save_base_update(update: dict[str, Tensor], adapter: LoraAdapter, path: str | Path) -> None:
    """Write dense updates ΔW (d×k, keyed by module) as '<module path in the model>.weight' in the layout of that
    base weight (transposed for embeddings and fan_in_fan_out), so that adding them to the base is all it takes."""
    tensors = {model_path(name) + ".weight": base_layout(t, adapter.modules[name], adapter.config).contiguous()
               for name, t in update.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
