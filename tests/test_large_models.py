"""Large-model options on tiny models: quantization's refusals (and, on a GPU with bitsandbytes, a 4-bit run),
gradient checkpointing, the base's dtype, target_modules = "all-linear", and the shipped configs."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from florana.config import RunConfig, config_from_dict, load_config
from florana.errors import FloranaError
from florana.federation.engine import run
from florana.lora import load_adapter
from florana.train.model import AdapterSlots, load_model, quantization_config
from tiny import arithmetic_jsonl, sentiment_csv, tiny_bert, tiny_bert_bf16, tiny_llama

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))
HAS_CUDA = torch.cuda.is_available()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"bert": tiny_bert(root), "bert-bf16": tiny_bert_bf16(root), "llama": tiny_llama(root),
            "csv": sentiment_csv(root), "jsonl": arithmetic_jsonl(root)}


def lora(targets, r=2):
    return {"r": r, "lora_alpha": 4.0, "lora_dropout": 0.0, "use_rslora": False, "target_modules": targets}


def lora_modules(model) -> set[str]:
    return {n.split(".lora_A.")[0] for n, _ in model.named_parameters() if ".lora_A." in n}


# ---- quantization ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_refused_on_the_cpu_naming_the_key(quantization, monkeypatch):
    with pytest.raises(FloranaError, match=rf"quantization='{quantization}' needs a CUDA device .* this run's "
                                           "device is cpu"):
        quantization_config(quantization, device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build of torch asked for cuda
    with pytest.raises(FloranaError, match=rf"quantization='{quantization}' needs a CUDA device and torch .* sees "
                                           "none"):
        quantization_config(quantization, device="cuda")
    assert quantization_config("none", device="cpu") is None


def test_quantization_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(FloranaError, match=r"quantization='4bit' needs bitsandbytes, which is not installed: "
                                           r"pip install 'florana\[gpu\]'"):
        quantization_config("4bit", device="cuda:0")


def test_quantization_follows_qlora(monkeypatch):
    """NF4 with double quantization computing in bf16 (fp16 where the GPU has no bf16, or as `dtype` says), or
    LLM.int8; checked with CUDA and bitsandbytes pretended, since only their presence is asked for here."""
    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes"
                        else real(name, *a))
    for bf16_ok, dtype, compute in ((True, "auto", torch.bfloat16), (False, "auto", torch.float16),
                                    (True, "float16", torch.float16), (False, "bfloat16", torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, ok=bf16_ok, **k: ok)
        q = quantization_config("4bit", dtype, device="cuda")
        assert (q.load_in_4bit, q.load_in_8bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant,
                q.bnb_4bit_compute_dtype) == (True, False, "nf4", True, compute)
    q = quantization_config("8bit", device="cuda:1")
    assert q.load_in_8bit and not q.load_in_4bit


def test_a_run_that_cannot_quantize_stops_before_loading_anything(assets, tmp_path):
    with pytest.raises(FloranaError, match="quantization='8bit' needs a CUDA device"):  # not 'unknown model'
        load_model("causal_lm", str(tmp_path / "no-such-model"), 2, lora(["q_proj"]), 0, quantization="8bit")
    cfg = RunConfig(model=str(assets["llama"]), task="causal_lm", dataset=str(tmp_path / "absent.jsonl"),
                    quantization="4bit", num_clients=2, target_modules=["q_proj"])
    with pytest.raises(FloranaError, match="quantization='4bit' needs a CUDA device"):  # not the missing file
        run(cfg, tmp_path / "run")


def test_config_keys_and_their_values():
    cfg = RunConfig()
    assert (cfg.quantization, cfg.dtype, cfg.gradient_checkpointing) == ("none", "auto", False)
    for data, message in (({"quantization": "nf4"}, "quantization must be one of none, 4bit, 8bit"),
                          ({"dtype": "half"}, "dtype must be one of auto, bfloat16, float16, float32"),
                          ({"gradient_checkpointing": 1}, "gradient_checkpointing should be bool")):
        with pytest.raises(FloranaError, match=message):
            config_from_dict(data, "c.toml")


class Packed4bit(torch.nn.Module):
    """Stands in for bitsandbytes' Linear4bit: in/out features, and a weight stored packed (two 4-bit codes a
    byte, shape (d·k/2, 1)) whose shape and values are not W0's; the forward unpacks it."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.W0 = linear.weight.detach().clone()
        self.weight = torch.nn.Parameter(torch.zeros(linear.weight.numel() // 2, 1, dtype=torch.uint8),
                                         requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, self.W0, self.bias)


def test_base_delta_needs_nothing_from_a_packed_base_weight(assets):
    """flora and fedex keep their base change as a float32 delta added by a hook on each LoRA module's base layer:
    it works with a quantized layer, whose stored weight is packed, since it never reads that weight."""
    model, tok = load_model("causal_lm", str(assets["llama"]), 2, lora(["q_proj", "down_proj"]), 0)
    slots = AdapterSlots.of(model)
    names = sorted(lora_modules(model))
    for name in names:
        module = model.get_submodule(name)
        module.base_layer = Packed4bit(module.base_layer)
    ids = tok(["the film was good", "a dull plot"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        plain = model(**ids).logits
        g = torch.Generator().manual_seed(1)
        delta = {n: torch.randn(model.get_submodule(n).base_layer.out_features,
                                model.get_submodule(n).base_layer.in_features, generator=g) * 0.1 for n in names}
        slots.set_base_delta(delta)
        changed = model(**ids).logits
        # the same delta added into an unpacked copy of the weights
        for n in names:
            layer = model.get_submodule(n).base_layer
            layer.W0 = layer.W0 + delta[n]
        slots.set_base_delta({})
        merged = model(**ids).logits
    assert not torch.allclose(plain, changed, atol=1e-3)
    torch.testing.assert_close(changed, merged, rtol=1e-4, atol=1e-5)


def test_base_weight_dequantizes_a_quantized_layer(assets, monkeypatch):
    """The one reader of base weights (resuming a checkpoint written before base deltas) gets W0 from a 4-bit layer
    by dequantizing it (peft's dequantize_module_weight), never the packed tensor."""
    import peft.utils.integrations as integrations

    model, _ = load_model("causal_lm", str(assets["llama"]), 2, lora(["q_proj"]), 0)
    slots = AdapterSlots.of(model)
    name = sorted(lora_modules(model))[0]
    W0 = model.get_submodule(name).base_layer.weight.detach().clone()
    assert torch.equal(slots.base_weight(name), W0)

    class Params4bit(torch.nn.Parameter):  # the class name is what peft dispatches on
        pass

    layer = model.get_submodule(name).base_layer
    layer.weight = Params4bit(torch.zeros(W0.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
    monkeypatch.setattr(integrations, "dequantize_bnb_weight", lambda w, state=None: W0 * 1)
    assert torch.equal(slots.base_weight(name), W0)


@pytest.mark.skipif(not (HAS_CUDA and HAS_BNB), reason="needs a CUDA GPU and bitsandbytes (pip install "
                                                      "'florana[gpu]')")
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_tiny_llama_trains_on_the_gpu(assets, quantization):
    import bitsandbytes as bnb

    model, tok = load_model("causal_lm", str(assets["llama"]), 2, lora(["q_proj", "v_proj"]), 0,
                            quantization=quantization, gradient_checkpointing=True, device="cuda")
    layer = model.get_submodule(sorted(lora_modules(model))[0]).base_layer
    assert isinstance(layer, bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt)
    assert layer.weight.device.type == "cuda"
    slots = AdapterSlots.of(model)
    slots.set_base_delta({n: torch.zeros(layer.out_features, layer.in_features, device="cuda")
                          for n in lora_modules(model)})
    ids = tok(["What is 2 plus 3? 5"], return_tensors="pt").to("cuda")
    model.train()
    loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in slots.trainable(train_A=False))


@pytest.mark.skipif(not (HAS_CUDA and HAS_BNB), reason="needs a CUDA GPU and bitsandbytes (pip install "
                                                      "'florana[gpu]')")
@pytest.mark.parametrize("method", ["florana", "fedex"])
def test_a_federated_run_on_a_4bit_base(assets, tmp_path, method):
    """Two rounds of the engine on a 4-bit tiny LLaMA, fedex's float32 base delta included. Needs the engine to
    place the run on the GPU (the `device` key, device 'auto' resolving to CUDA)."""
    cfg = RunConfig(task="causal_lm", model=str(assets["llama"]), dataset=str(assets["jsonl"]), text_column="question",
                    label_column="answer", target_modules=["q_proj", "v_proj"], method=method, num_clients=2,
                    partition="iid", rounds=2, local_steps=2, batch_size=4, eval_batch_size=8, test_size=4,
                    client_test_max=2, max_length=32, max_new_tokens=2, lora_r=2, lora_alpha=4.0,
                    quantization="4bit", gradient_checkpointing=True)
    result = run(cfg, tmp_path / "run")
    assert [m["round"] for m in result.history] == [1, 2]
    assert all(math.isfinite(m["train_loss"]) for m in result.history)


# ---- gradient checkpointing -----------------------------------------------------------------------------------
def _loss_and_grads(model, batch):
    model.train()
    with torch.no_grad():  # B starts at zero, which would leave A without gradient
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    calls = []
    layer = next(m for n, m in model.named_modules() if n.endswith(("layers.0.self_attn", "layer.0.attention.self")))
    handle = layer.register_forward_hook(lambda *a: calls.append(1))
    loss = model(**batch).loss
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(assets, kind):
    task, targets = ("causal_lm", ["q_proj", "v_proj"]) if kind == "llama" else ("classification", ["query", "value"])
    results = {}
    for checkpointing in (False, True):
        model, tok = load_model(task, str(assets[kind]), 2, lora(targets), 0, gradient_checkpointing=checkpointing)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        batch = dict(tok(["the film was good and moving", "a dull plot"], return_tensors="pt", padding=True))
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100) if kind == "llama" \
            else torch.tensor([1, 0])
        results[checkpointing] = _loss_and_grads(model, batch)
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results[False], results[True]
    assert (calls0, calls1) == (1, 2)  # checkpointed: the layer runs again in the backward pass
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys() and any(".lora_A." in n for n in grads0)
    for n in grads0:
        assert grads0[n].abs().sum() > 0, n  # gradients reach LoRA through the frozen, checkpointed base
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-7)


# ---- dtype ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float16", "float32"])
def test_base_dtype_as_asked_and_lora_in_float32(assets, dtype):
    """'auto' loads as the checkpoint stores it (float32 here and for the offline minilm and smollm2, so the CPU
    default is unchanged; bf16 for a bf16 checkpoint); LoRA factors stay float32 (PEFT's autocast_adapter_dtype),
    and one training step runs on the CPU in each dtype."""
    model, tok = load_model("causal_lm", str(assets["llama"]), 2, lora(["q_proj", "v_proj"]), 0, dtype=dtype)
    expected = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {expected}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    ids = tok(["What is 2 plus 3? 5"], return_tensors="pt")
    model.train()
    loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    if dtype == "auto":
        bert, _ = load_model("classification", str(assets["bert-bf16"]), 2, lora(["query"]), 0)
        assert bert.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query").base_layer.weight \
            .dtype == torch.bfloat16


# ---- target_modules = "all-linear" ----------------------------------------------------------------------------
def test_all_linear_in_toml_and_its_limits(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('target_modules = "all-linear"\n')
    cfg = load_config(path)
    assert cfg.target_modules == ["all-linear"]
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg
    from florana.flower.wire import split_run_config

    assert split_run_config({"target_modules": "all-linear"})[0].target_modules == ["all-linear"]  # Flower's form
    with pytest.raises(FloranaError, match="'all-linear' stands for every linear layer and cannot be listed"):
        RunConfig(target_modules=["all-linear", "q_proj"])
    with pytest.raises(FloranaError, match="target_modules should be a list of non-empty strings"):
        RunConfig(target_modules="q_proj")


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_all_linear_adapts_every_linear_layer_but_the_head(assets, kind):
    task = "causal_lm" if kind == "llama" else "classification"
    model, _ = load_model(task, str(assets[kind]), 2, lora(["all-linear"]), 0)
    base = model.get_base_model()
    head = "lm_head" if kind == "llama" else "classifier"
    linear = {f"base_model.model.{n}".removesuffix(".base_layer") for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and ".lora_" not in n and ".modules_to_save" not in n
              and not n.startswith(head)}
    adapted = lora_modules(model)
    assert adapted == linear
    if kind == "llama":
        assert {n.rsplit(".", 1)[1] for n in adapted} == LLAMA_LINEAR and len(adapted) == 2 * len(LLAMA_LINEAR)
    else:  # 6 per layer (query, key, value, attention.output, intermediate, output) and the pooler
        assert len(adapted) == 2 * 6 + 1 and "base_model.model.bert.pooler.dense" in adapted


@pytest.mark.parametrize("method", ["florana", "flora"])
def test_a_round_with_all_linear_aggregates_every_module(assets, tmp_path, method):
    """Modules of different shapes (q/k/v/o 32×32, gate/up 64×32, down 32×64) aggregated in one round, with
    checkpointing, including flora's base delta (one per module, each of its own shape) on a bf16 base."""
    cfg = RunConfig(task="causal_lm", model=str(assets["llama"]), dataset=str(assets["jsonl"]), text_column="question",
                    label_column="answer", target_modules=["all-linear"], method=method, num_clients=2,
                    partition="iid", rounds=1, local_steps=1, batch_size=4, eval_batch_size=8, test_size=4,
                    client_test_max=2, max_length=32, max_new_tokens=2, lora_r=2, lora_alpha=4.0, threads=1,
                    bf16=False, gradient_checkpointing=True, dtype="bfloat16" if method == "flora" else "auto")
    result = run(cfg, tmp_path / "run")
    assert result.history[0]["relative_error"] < 1e-5 if method == "flora" else result.history[0]["relative_error"] >= 0
    adapter = load_adapter(tmp_path / "run" / "global_adapter")
    kinds = {name.rsplit(".", 1)[1]: m.shape for name, m in adapter.modules.items()}
    assert set(kinds) == LLAMA_LINEAR and len(adapter.modules) == 14
    assert kinds["gate_proj"] == (64, 32) and kinds["down_proj"] == (32, 64) and kinds["q_proj"] == (32, 32)


# ---- shipped configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), RunConfig)


def test_the_paper_configs_say_what_they_run():
    llama = load_config(CONFIGS[0].parent / "paper_gsm8k_llama2_7b.toml")
    assert (llama.model, llama.dataset, llama.num_clients, llama.target_modules) == (
        "meta-llama/Llama-2-7b-hf", "openai/gsm8k:main", 10, ["q_proj", "k_proj", "v_proj", "o_proj"])
    qwen = load_config(CONFIGS[0].parent / "gsm8k_qwen2.5_0.5b.toml")
    assert qwen.model == "Qwen/Qwen2.5-0.5B-Instruct" and qwen.task == "causal_lm"
    for cfg in (llama, qwen):
        assert (cfg.text_column, cfg.label_column) == ("question", "answer")
