"""`florana export`: a finished run's global model as files other tools load without florana.

- the adapter: the run's global_adapter/ as a PEFT folder (PeftModel.from_pretrained on the run's base model);
- the merged model: base + global LoRA (PEFT's merge_and_unload) + the base delta of the methods that change the
  base (flora, fedex), written with save_pretrained together with the tokenizer, the trained classification head
  and the run's label names (config.id2label), for AutoModelFor*.from_pretrained.

Only a finished run exports (every configured round done and global_adapter/ written at its close): the global
adapter of an unfinished run is not its last round's (or not there), so exporting it would mislabel a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from florana.config import RunConfig, load_config
from florana.errors import FloranaError
from florana.federation.engine import lora_settings, read_metrics
from florana.federation.folders import check_export_folder
from florana.federation.methods import method_of
from florana.lora.adapter import PEFT_PREFIX
from florana.lora.peft_io import BASE_UPDATE_FILE, WEIGHTS_FILE, atomic_directory, load_adapter, save_adapter

GLOBAL_ADAPTER = "global_adapter"


def finished_config(run_dir: Path) -> RunConfig:
    """The config of a finished run with a global model, or an error saying why `run_dir` does not export."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FloranaError(f"{run_dir}: not a florana run folder (no config.toml)")
    config = load_config(run_dir / "config.toml")
    done = len(read_metrics(run_dir))
    if done < config.rounds or not (run_dir / GLOBAL_ADAPTER).is_dir():
        raise FloranaError(f"{run_dir}: the run is not finished ({done} of {config.rounds} rounds done): finish it "
                           f"with `florana run --resume {run_dir}`, then export")
    method = method_of(config)
    if config.method == "local" or (method is not None and method.personal_B):
        raise FloranaError(f"{run_dir}: a {config.method} run has no global model to export (each client keeps "
                           f"{'its own adapter' if config.method == 'local' else 'its own B'})")
    return config


def label_names(run_dir: Path) -> list[str]:
    """The run's label names in label-id order, as partition.json's histograms list them."""
    stats = json.loads((Path(run_dir) / "partition.json").read_text())
    return list(stats[0]["labels"]) if stats else []


def export_adapter(run_dir: Path, out: Path) -> None:
    """Write the run's global PEFT adapter into `out`. Refused where the run changed the base weights: the adapter
    alone is then not the run's model."""
    config = finished_config(run_dir)
    check_export_folder(out, run_dir, "--adapter")
    if (Path(run_dir) / GLOBAL_ADAPTER / BASE_UPDATE_FILE).exists():
        raise FloranaError(f"{run_dir}: {config.method} changed the base model's weights, so its adapter alone is not "
                           f"the run's model: export it with --merged OUT (florana itself reads the adapter with "
                           f"its {BASE_UPDATE_FILE} from {Path(run_dir) / GLOBAL_ADAPTER})")
    save_adapter(load_adapter(Path(run_dir) / GLOBAL_ADAPTER), out)


def merged_model(run_dir: Path, config: RunConfig):
    """(transformers model, tokenizer): the run's base with the global adapter merged in by PEFT's merge_and_unload
    and the base delta added. Each adapted weight is summed in float32 (W0 + Δbase + s·B·A) and cast to the base's
    dtype once: a bfloat16 base loses the low bits of that sum, as any merged bfloat16 model does."""
    from safetensors.torch import load_file

    from florana.train.model import AdapterSlots, load_model

    if config.quantization != "none":
        raise FloranaError(f"{run_dir}: the run's base is quantized ({config.quantization}): its weights cannot take "
                           "the adapter merged in; export the adapter with --adapter and merge it into an "
                           "unquantized copy of the base")
    labels = label_names(run_dir)
    model, tokenizer = load_model(config.task, config.model, len(labels), lora_settings(config), config.seed,
                                  dtype=config.dtype, device="cpu")
    slots = AdapterSlots.of(model)
    folder = Path(run_dir) / GLOBAL_ADAPTER
    tensors = load_file(folder / WEIGHTS_FILE)
    if unknown := sorted(set(tensors) - set(slots.params)):
        raise FloranaError(f"{folder}: tensors {unknown[:3]} are not in the model of the run's config.toml")
    slots.write(tensors)
    delta = load_file(folder / BASE_UPDATE_FILE) if (folder / BASE_UPDATE_FILE).exists() else {}
    dtypes = {}
    with torch.no_grad():
        for module in slots.full_scaling:  # float32 weights for the merge, the delta added in (its file: base layout)
            layer = model.get_submodule(module).base_layer
            dtypes[module] = layer.weight.dtype
            key = module.removeprefix(PEFT_PREFIX) + ".weight"
            layer.weight.data = layer.weight.float() + (delta.pop(key).float() if key in delta else 0)
        if delta:
            raise FloranaError(f"{folder / BASE_UPDATE_FILE}: {sorted(delta)[:3]} are no LoRA module's weights")
        merged = model.merge_and_unload(safe_merge=True)
        for module, dtype in dtypes.items():
            layer = merged.get_submodule(module.removeprefix(PEFT_PREFIX))
            layer.weight.data = layer.weight.to(dtype)
    if config.task == "classification":
        merged.config.id2label = dict(enumerate(labels))
        merged.config.label2id = {name: i for i, name in enumerate(labels)}
    return merged.eval(), tokenizer


def export_merged(run_dir: Path, out: Path) -> None:
    """Write the run's final model, merged, with its tokenizer into `out` (atomically: all of it or nothing)."""
    config = finished_config(run_dir)
    check_export_folder(out, run_dir, "--merged")
    model, tokenizer = merged_model(run_dir, config)
    with atomic_directory(out, owned=None) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
