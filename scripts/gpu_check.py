"""The checks of scripts/gpu_check.sh: florana on one CUDA GPU, offline, on tiny models made from configs and
generated data, one line per check: `CHECK name: PASS|FAIL|SKIP details`.

It needs torch, transformers, peft, numpy, safetensors and tomli_w (gpu_check.sh brings tomli_w's wheel from .whl/);
not flwr, datasets, matplotlib, typer or rich, nor any model download. FLORANA_GPU_CHECK_DEVICE=cpu runs the same
logic on the CPU at tiny sizes (what the test suite does); the GPU-only numbers are then skipped.

    python scripts/gpu_check.py [--only NAME,...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVICE = os.environ.get("FLORANA_GPU_CHECK_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
NEEDED = ("torch", "transformers", "peft", "numpy", "safetensors", "tomli_w")
sys.path.insert(0, str(ROOT / "tests"))
from tiny import BAD, FILL, GOOD, arithmetic_jsonl, sentiment_csv  # noqa: E402  the test suite's generated data
WORDS = GOOD + BAD + FILL + "what plus question answer".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
results: list[tuple[str, str, str]] = []


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def report(name: str, status: str, details: str) -> None:
    results.append((name, status, details))
    print(f"CHECK {name}: {status} {details}", flush=True)


def check(name: str):
    """Run a check function; an exception is its FAIL (with the last lines of the traceback), never the script's."""
    def wrap(fn):
        def run(*args):
            t0 = time.perf_counter()
            try:
                status, details = fn(*args)
            except Exception as e:  # a check's failure is reported, and the next check runs
                tail = " | ".join(traceback.format_exc().strip().splitlines()[-3:])
                status, details = "FAIL", f"{type(e).__name__}: {e} ({tail})"
            report(name, status, f"{details} [{time.perf_counter() - t0:.1f} s]")
        run.check_name = name
        return run
    return wrap


# ---- tiny assets, made offline -------------------------------------------------------------------------------
def tokenizer_into(folder: Path) -> None:
    """A BERT WordPiece tokenizer over a generated vocabulary (the words below, digits and '##' digits)."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + WORDS + list("0123456789.,?:!-") + [f"##{d}" for d in "0123456789"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)


def tiny_bert(root: Path, name: str = "tiny-bert", hidden: int = 32, layers: int = 2) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    out = root / name
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=hidden * 3 // 2, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tokenizer_into(out)
    return out


def tiny_llama(root: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / "tiny-llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer_into(out)
    return out


def base_config(assets: dict, **kw):
    from florana.config import RunConfig

    cfg = dict(model=str(assets["bert"]), dataset=str(assets["csv"]), num_clients=4, rounds=2, local_steps=3,
               batch_size=8, test_size=60, client_test_max=10, max_length=16, lora_r=4, lora_alpha=8.0, threads=2,
               lr=5e-3, alpha=1.0, device=DEVICE, target_modules=["query", "value"])
    cfg.update(kw)
    return RunConfig(**cfg)


def run_rounds(config, run_dir: Path, resume: bool = False):
    """engine.run less its plots (matplotlib is not on a bare GPU machine): the run folder, checkpoints,
    metrics.jsonl and global_adapter/ as a run writes them."""
    from florana.federation.engine import open_run, record_round

    fed, start = open_run(config, run_dir, resume=resume)
    for r in range(start, fed.config.rounds + 1):
        record_round(fed, run_dir, fed.round(r))
    fed.save_global(run_dir / "global_adapter")
    return fed


# ---- the checks ----------------------------------------------------------------------------------------------
@check("imports")
def check_imports(assets):
    import torch

    missing = [m for m in NEEDED if not installed(m)]
    absent = [m for m in ("flwr", "datasets", "matplotlib", "bitsandbytes") if not installed(m)]
    import florana.federation.engine  # noqa: F401  the in-process path, without flwr, typer, rich or datasets

    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"flwr", "typer", "rich", "matplotlib", "datasets", "ray"})
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    details = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU {gpu}; not installed: "
               f"{', '.join(absent) or 'none'}; imported by the engine: {', '.join(heavy) or 'nothing heavy'}")
    if missing or heavy or not installed("florana"):
        return "FAIL", f"missing {missing}; " + details
    if ON_GPU and not torch.cuda.is_available():
        return "FAIL", "no CUDA GPU; " + details
    return "PASS", details


@check("cuda_run")
def check_cuda_run(assets):
    """2 rounds of FLoRA-NA on a tiny BERT on the device, then a third resumed from the checkpoint."""
    import torch

    from florana.federation.engine import read_metrics

    cfg = base_config(assets)
    run_dir = assets["root"] / "run-florana"
    fed = run_rounds(cfg, run_dir)
    history = read_metrics(run_dir)
    where = next(fed.model.parameters()).device
    assert where.type == torch.device(DEVICE).type, f"the model is on {where}"
    assert len(history) == 2 and all(math.isfinite(m["global_accuracy"]) for m in history), history
    assert all(t.device.type == "cpu" for t in fed.state_tensors().values())
    peaks = [m.get("gpu_peak_mib") for m in history]
    if ON_GPU:
        assert all(p is not None and p > 0 for p in peaks), peaks
    else:
        assert peaks == [None, None], peaks
    assert (run_dir / "global_adapter" / "adapter_model.safetensors").is_file()
    more = run_rounds(cfg.with_overrides(rounds=3), run_dir, resume=True)
    assert len(read_metrics(run_dir)) == 3 and more.config.rounds == 3
    m = history[-1]
    return "PASS", (f"2 rounds on {where} ({fed.precision.dtype or 'float32'} autocast), global acc "
                    f"{m['global_accuracy']:.3f}, relative error {m['relative_error']:.2e}, gpu_peak_mib {peaks}; "
                    f"resumed to round 3")


@check("cuda_base_delta")
def check_base_delta(assets):
    """flora and fedex keep their base change as a float delta on the model's device."""
    from florana.federation.engine import read_metrics

    out = []
    for method in ("flora", "fedex"):
        fed = run_rounds(base_config(assets, method=method), assets["root"] / f"run-{method}")
        history = read_metrics(assets["root"] / f"run-{method}")
        devices = {t.device.type for t in fed.slots.base_delta.values()}
        assert devices == {fed.device.type}, devices
        assert all(m["relative_error"] < 1e-4 for m in history), [m["relative_error"] for m in history]
        out.append(f"{method} error {max(m['relative_error'] for m in history):.1e}")
    return "PASS", ", ".join(out) + " (exact, base delta on the device)"


def causal_rounds(assets: dict, name: str, **kw) -> str:
    """Two rounds of the tiny Llama on the generated sums (instruction SFT, greedy scoring); its answer losses."""
    from florana.federation.engine import read_metrics

    cfg = base_config(assets, task="causal_lm", model=str(assets["llama"]), dataset=str(assets["jsonl"]),
                      text_column="question", label_column="answer", test_size=20, max_length=32, max_new_tokens=6,
                      target_modules=["q_proj", "v_proj"], partition="iid", **kw)
    run_rounds(cfg, assets["root"] / name)
    history = read_metrics(assets["root"] / name)
    assert len(history) == 2 and all(math.isfinite(m["global_loss"]) for m in history), history
    return f"answer loss {history[0]['global_loss']:.3f} → {history[-1]['global_loss']:.3f}"


@check("cuda_causal_lm")
def check_causal(assets):
    """A tiny Llama, instruction SFT and greedy generation on the device."""
    return "PASS", "2 rounds, " + causal_rounds(assets, "run-causal")


@check("fp16_gradscaler")
def check_fp16(assets):
    """float16 autocast with a GradScaler (what a GPU without bf16 gets), forced on this device."""
    import numpy as np
    import torch

    from florana.federation.engine import Federation
    from florana.train.device import Precision
    from florana.train.local import batch_indices, train_steps

    fed = Federation(base_config(assets, num_clients=2))
    data = fed.data.clients[0].train
    before = {k: v.clone() for k, v in fed.slots.read().items()}
    precision = Precision(fed.device, torch.float16)
    fed.task.precision = precision
    loss = train_steps(fed.model, fed.params, lambda idx: fed.task.batch(data, idx),
                       batch_indices(len(data), 8, 6, np.random.default_rng(0)), lr=5e-3, weight_decay=0.0,
                       precision=precision)
    after = fed.slots.read()
    moved = sum(not torch.equal(before[k], after[k]) for k in before)
    assert math.isfinite(loss) and moved > 0, (loss, moved)
    return "PASS", f"loss {loss:.3f}, {moved}/{len(before)} adapter tensors trained under float16 + GradScaler"


@check("aggregation_devices")
def check_aggregation(assets):
    """Every method on the device against the CPU, on small random clients."""
    import torch

    from florana.aggregation import METHODS, aggregate_adapters
    from florana.lora import LoraAdapter, LoraModule

    g = torch.Generator().manual_seed(0)
    shapes = {"m.q": (24, 20), "m.v": (24, 20), "m.o": (32, 20)}
    shared = {n: torch.randn(4, k, generator=g) for n, (d, k) in shapes.items()}
    worst = 0.0
    for name, method in METHODS.items():
        clients = []
        for u in range(4):
            mods = {f"base_model.model.{n}": LoraModule(A=shared[n] if not method.trains_A or name == "rolora" else
                                                        shared[n] + 0.2 * torch.randn(4, k, generator=g),
                                                        B=torch.randn(d, 4, generator=g)) for n, (d, k) in shapes.items()}
            clients.append(LoraAdapter({"r": 4, "lora_alpha": 8, "target_modules": ["q", "v", "o"]}, mods))
        cpu = aggregate_adapters(clients, name, weights=[1, 2, 3, 4])
        dev = aggregate_adapters(clients, name, weights=[1, 2, 3, 4], device=DEVICE)
        assert all(t.device.type == torch.device(DEVICE).type for t in dev.adapter.state_dict().values()), name
        assert abs(dev.report.relative_error - cpu.report.relative_error) < 1e-6, name
        for k, t in cpu.adapter.state_dict().items():
            gap = ((dev.adapter.state_dict()[k].cpu() - t).norm() / t.norm().clamp_min(1e-30)).item()
            worst = max(worst, gap)
    assert worst < 1e-4, worst
    return "PASS", f"{len(METHODS)} methods on {DEVICE} equal the CPU's (largest relative factor gap {worst:.1e})"


@check("4bit")
def check_4bit(assets):
    """A causal LM in 4-bit (QLoRA-style) for 2 rounds, where bitsandbytes and florana's quantization are there."""
    if not installed("bitsandbytes"):
        return "SKIP", "4bit: bitsandbytes not installed (pip install 'florana[gpu]' where it can come along)"
    if not ON_GPU:
        return "SKIP", "4bit: bitsandbytes 4-bit needs a CUDA GPU"
    return "PASS", "2 rounds in 4-bit, " + causal_rounds(assets, "run-4bit", quantization="4bit")


@check("gpu_memory")
def check_memory(assets):
    """benchmarks/gpu_memory.py: peak GPU memory with 100 clients ≤ 1.1× that with 2, on a BERT of base width (768,
    6 layers, ~100 MB in float32) so that, as with any real model, the base model is most of what the GPU holds;
    on the 32-wide tiny BERT a hundred clients' 400×400 aggregation matrices would outweigh the model itself."""
    if not ON_GPU:
        return "SKIP", "gpu_peak_mib is measured on CUDA only"
    model = tiny_bert(assets["root"], "bert-base-width", hidden=768, layers=6)
    extra = {"max_length": 16, "lora_r": 4, "lora_alpha": 8.0, "batch_size": 8, "client_test_max": 2}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_memory.py"), "--model", str(model),
                          "--dataset", str(assets["csv"]), "--test-size", "60", "--steps", "1", "--device", DEVICE,
                          "--config", json.dumps(extra)], capture_output=True, text=True, timeout=300)
    text = out.stdout.strip()
    last = text.splitlines()[-1] if text else out.stderr[-500:]
    return ("PASS" if out.returncode == 0 and "met" in last else "FAIL"), last.replace("\n", " ")


@check("aggregation_7b")
def check_7b(assets):
    """The LLaMA-2-7B-shape FLoRA-NA aggregation with its error report (128 modules 4096×4096, r=16, 10 clients)."""
    shape = [] if ON_GPU else ["--layers", "1", "--dim", "256", "--repeats", "1"]  # the CPU dry run: tiny
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aggregation_speed.py"), "--case", "llama7b",
                          "--device", DEVICE, *shape], capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        return "FAIL", out.stderr.strip()[-800:]
    target = lines[-1]
    summary = " / ".join(line for line in lines if line.startswith(("florana on", "report:")))
    return ("PASS" if target.endswith("met") else "FAIL"), f"{summary} / {target}"


CHECKS = [check_imports, check_cuda_run, check_base_delta, check_causal, check_fp16, check_aggregation, check_4bit,
          check_memory, check_7b]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated check names (default: all)")
    ap.add_argument("--keep", default=None, help="make the tiny assets and run folders here (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    with tempfile.TemporaryDirectory(prefix="florana-gpu-check-") as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        try:
            assets = {"root": root, "bert": tiny_bert(root), "llama": tiny_llama(root),
                      "csv": sentiment_csv(root, n=600), "jsonl": arithmetic_jsonl(root, n=120)}
        except Exception as e:
            report("assets", "FAIL", f"cannot build the tiny models offline: {type(e).__name__}: {e}")
            return 1
        for fn in CHECKS:
            if not only or fn.check_name in only:
                fn(assets)
    failed = [n for n, status, _ in results if status == "FAIL"]
    print(f"gpu_check on {DEVICE}: {sum(s == 'PASS' for _, s, _ in results)} passed, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}, {sum(s == 'SKIP' for _, s, _ in results)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
