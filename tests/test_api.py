"""florana.aggregate, the Python API: adapters built by PEFT itself (state dicts, PeftModels, folders) give what
aggregate_adapters and `florana aggregate` give, in PEFT's keys, dtypes and devices; bad input names the client."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

import florana
from florana.aggregation import aggregate_adapters
from florana.cli import app as cli
from florana.client_helpers import apply_base_update, client_part
from florana.lora import load_adapter

ROOT = Path(__file__).resolve().parent.parent
LORA = LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS", r=4, lora_alpha=8)
Q = "base_model.model.bert.encoder.layer.0.attention.self.query"


def base_model():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=24, num_labels=2)).eval()


def client_model(seed, lora=LORA):
    """A PeftModel on the shared tiny base, with trained-looking factors and head of its own seed."""
    base = base_model()
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(**{**lora.to_dict(), "init_lora_weights": False}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models():
    return [client_model(100 + u) for u in range(3)]


@pytest.fixture(scope="module")
def folders(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    for u, m in enumerate(models):
        m.save_pretrained(root / f"client{u}")
    return [root / f"client{u}" for u in range(3)]


def ideal_delta(states, weights, key):
    return sum(w * 2.0 * s[key + ".lora_B.weight"] @ s[key + ".lora_A.weight"] for w, s in zip(weights, states))


@pytest.mark.parametrize("method", ["fedit", "florana", "svd", "lora_fair"])
def test_state_dicts_models_and_folders_agree_with_aggregate_adapters_and_the_cli(models, folders, tmp_path, method):
    states = [get_peft_model_state_dict(m) for m in models]
    weights = [1, 2, 1]
    from_states, report = florana.aggregate(states, method, lora_config=LORA, weights=weights)
    from_models, _ = florana.aggregate(models, method, weights=weights)
    mixed, _ = florana.aggregate([states[0], models[1], folders[2]], method, lora_config=LORA, weights=weights)
    reference = aggregate_adapters([load_adapter(f) for f in folders], method, weights)
    done = CliRunner().invoke(cli, ["aggregate", *map(str, folders), "--method", method, "--weights", "1,2,1",
                                    "--out", str(tmp_path / "cli")])
    assert done.exit_code == 0, done.output
    from_cli = load_file(tmp_path / "cli" / "adapter_model.safetensors")
    assert from_states.keys() == set(states[0]) == from_cli.keys()  # PEFT's keys, heads included
    for other in (from_models, mixed, reference.adapter.state_dict(), from_cli):
        assert all(torch.equal(from_states[k], other[k]) for k in from_states)
    assert report.relative_error == reference.report.relative_error and report.method == method
    # svd attains the floor: the two agree to rounding (1 ulp apart on some CPUs), so both bounds carry 1e-12
    assert report.error_floor <= report.relative_error + 1e-12
    assert report.relative_error <= report.fedit_error + 1e-12
    assert len(report.modules) == 4 and report.bytes_up_per_client == reference.report.bytes_up_per_client
    assert report.lora_config["r"] == 4 and report.base_update == {}
    json.dumps(report.to_json())  # the report is JSON-able (base_update listed by module, not dumped)
    # the global adapter loads into a PeftModel: the head is the weighted mean, the product the method's estimate
    model = client_model(0)
    set_peft_model_state_dict(model, from_states)
    w = [0.25, 0.5, 0.25]
    head = model.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(head, sum(wu * s["base_model.model.classifier.weight"] for wu, s in zip(w, states)))
    merged = model.merge_and_unload().state_dict()
    key = "bert.encoder.layer.0.attention.self.query.weight"
    ideal = ideal_delta(states, w, Q)
    err = ((merged[key] - base_model().state_dict()[key]) - ideal).norm() / ideal.norm()
    assert err.item() == pytest.approx(report.modules[Q]["relative_error"], abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_in_is_that_dtype_out(models, dtype):
    states = [{k: v.to(dtype) for k, v in get_peft_model_state_dict(m).items()} for m in models]
    out, report = florana.aggregate(states, "svd", lora_config=LORA)
    assert {t.dtype for t in out.values()} == {dtype}
    exact, exact_report = florana.aggregate([get_peft_model_state_dict(m) for m in models], "svd", lora_config=LORA)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-6}[dtype]
    assert report.relative_error == pytest.approx(exact_report.relative_error, abs=10 * tol)
    for k in out:
        torch.testing.assert_close(out[k].double(), exact[k].double(), rtol=tol, atol=tol)


def test_flora_and_fedex_give_the_base_update_that_makes_them_exact(models):
    """apply_base_update adds report.base_update to the base weights: flora's merged stack (clients restart LoRA),
    fedex's residual (with the global adapter loaded): either way the model moves by exactly ΔW*."""
    states = [get_peft_model_state_dict(m) for m in models]
    key = "bert.encoder.layer.1.attention.self.value.weight"
    ideal = ideal_delta(states, [1 / 3] * 3, "base_model.model." + key[: -len(".weight")])
    for method in ("flora", "fedex"):
        out, report = florana.aggregate(states, method, lora_config=LORA)
        assert sorted(report.base_update) == sorted(k[: -len(".lora_A.weight")] for k in out if ".lora_A." in k)
        model = client_model(0)
        if method == "flora":
            assert report.lora_config["r"] == 12  # the stack, Σ r_u
            with torch.no_grad():  # a fresh LoRA: zero B, so the model is the base plus the update
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.zero_()
        else:
            set_peft_model_state_dict(model, out)
        apply_base_update(model, report.base_update)
        merged = model.merge_and_unload().state_dict()
        torch.testing.assert_close(merged[key] - base_model().state_dict()[key], ideal, rtol=1e-5, atol=1e-6)


def test_fedsa_clients_load_only_a_and_a_smaller_rank_its_first_components(models):
    states = [get_peft_model_state_dict(m) for m in models]
    out, _ = florana.aggregate(states, "fedsa", lora_config=LORA)
    part = client_part(out, "fedsa")
    assert not any(".lora_B." in k for k in part) and f"{Q}.lora_A.weight" in part
    assert "base_model.model.classifier.weight" in part
    assert set(client_part(out, "flora")) == {k for k in out if ".lora_" not in k}  # flora: a fresh LoRA
    assert set(client_part(out, "rolora", round=1)) == {k for k in out if ".lora_B." not in k}  # A frozen, sent
    cut = client_part(out, "svd", rank=2, scaling_ratio=2.0)
    assert cut[f"{Q}.lora_A.weight"].shape == (2, 16) and torch.equal(cut[f"{Q}.lora_B.weight"],
                                                                       2.0 * out[f"{Q}.lora_B.weight"][:, :2])


def test_mixed_ranks_follow_the_method(tmp_path):
    """A rank-2 client among rank-4 ones: methods that pad accept it (the global rank is the largest), others
    refuse it naming the client."""
    small = LoraConfig(**{**LORA.to_dict(), "r": 2})
    models = [client_model(1), client_model(2, small)]
    out, report = florana.aggregate(models, "hetlora")
    assert out[f"{Q}.lora_A.weight"].shape == (4, 16) and report.lora_config["r"] == 4
    # state dicts of clients whose scalings differ too (alpha 8 at r=4, alpha 2 at r=2): one lora_config each
    other = LoraConfig(**{**LORA.to_dict(), "r": 2, "lora_alpha": 2})
    pair = [client_model(1), client_model(3, other)]
    from_models, _ = florana.aggregate(pair, "svd")
    from_states, _ = florana.aggregate([get_peft_model_state_dict(m) for m in pair], "svd", lora_config=[LORA, other])
    assert all(torch.equal(from_models[k], from_states[k]) for k in from_models)
    with pytest.raises(florana.FloranaError, match="got 1 lora_configs for 2 clients"):
        florana.aggregate([get_peft_model_state_dict(m) for m in pair], "svd", lora_config=[LORA])
    with pytest.raises(florana.FloranaError, match=f"client 1: module {Q}: rank 2 differs from client 0's 4; "
                                                   "rolora needs equal ranks"):
        florana.aggregate(models, "rolora")


def test_bad_inputs_name_the_client_and_the_module(models):
    states = [{k: v.clone() for k, v in get_peft_model_state_dict(m).items()} for m in models]

    def fails(message, clients, **kw):
        with pytest.raises(florana.FloranaError, match=re.escape(message)):
            florana.aggregate(clients, "florana", **{"lora_config": LORA, **kw})

    broken = dict(states[1])
    del broken[f"{Q}.lora_B.weight"]
    fails(f"client 1: module {Q}: has {Q}.lora_A.weight but no {Q}.lora_B.weight", [states[0], broken])
    fails(f"client 1: module {Q}: shape (8, 16) differs from client 0's (16, 16)",
          [states[0], {**states[1], f"{Q}.lora_B.weight": torch.zeros(8, 4)}])
    nan = {**states[2], f"{Q}.lora_B.weight": states[2][f"{Q}.lora_B.weight"].clone()}
    nan[f"{Q}.lora_B.weight"][0, 0] = math.nan
    fails(f"bob: module {Q}: lora_B holds NaN or Inf", [states[0], nan], labels=["alice", "bob"])
    fails("client 1: has tensor extra.weight that client 0 lacks", [states[0], {**states[1], "extra.weight":
                                                                                 torch.zeros(2)}])
    inf_head = {**states[1], "base_model.model.classifier.bias": torch.tensor([math.inf, 0.0])}
    fails("client 1: tensor base_model.model.classifier.bias holds NaN or Inf", [states[0], inf_head])
    fails("client 0 is a state dict: pass lora_config", states, lora_config=None)
    fails("client 0: lora_config: DoRA adapters are not supported", states,
          lora_config={**LORA.to_dict(), "use_dora": True})
    fails("got 2 client weights for 3 clients", states, weights=[1, 2])
    fails("client 1: expected a PEFT state dict, a PeftModel or an adapter folder, got int", [states[0], 3])
    fails("clients must be a list", states[0])
    meta = {k: torch.empty_like(v, device="meta") for k, v in states[1].items()}
    fails("the clients' tensors are on different devices (client 0: cpu, client 1: meta", [states[0], meta])


def test_import_florana_is_light():
    code = "import sys, florana; assert 'torch' not in sys.modules, 'torch'; print(sorted(florana.__all__))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert florana.aggregate is not None and florana.AggregateReport is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        florana.nothing  # noqa: B018


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use florana's aggregators in your own code", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_readme_examples_run(tmp_path, monkeypatch, capsys):
    """The README's two examples, a plain PEFT loop and Trainer clients, run as written (one after the other)."""
    monkeypatch.chdir(tmp_path)
    loop, trainer = readme_examples()
    scope: dict = {}
    exec(compile(loop, "README:plain-loop", "exec"), scope)
    printed = capsys.readouterr().out
    assert re.search(r"round 1: error \d\.\d+(e-\d+)?, rank-r floor", printed), printed
    assert scope["report"].method == "florana" and scope["report"].relative_error > 0
    before = {k: v.clone() for k, v in scope["global_state"].items()}
    exec(compile(trainer, "README:trainer", "exec"), scope)
    after, report = scope["global_state"], scope["report"]
    assert report.method == "svd" and report.weights == pytest.approx([1 / 3] * 3)
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in after)
    assert all(torch.equal(p, after[k]) for k, p in get_peft_model_state_dict(scope["trainers"][2].model).items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: tensors on it must come back on it")
def test_tensors_on_a_gpu_come_back_on_it(models):
    cpu_states = [get_peft_model_state_dict(m) for m in models]
    states = [{k: v.cuda() for k, v in s.items()} for s in cpu_states]
    for method in ("florana", "fedex"):
        out, report = florana.aggregate(states, method, lora_config=LORA)
        expected, _ = florana.aggregate(cpu_states, method, lora_config=LORA)
        assert all(t.is_cuda for t in [*out.values(), *report.base_update.values()])
        assert all(torch.equal(out[k].cpu(), expected[k]) for k in expected)


def test_method_options_reach_the_method(models, folders):
    """lora_fair's λ (and fedsvd's period) through options=, as `florana run` passes its config keys."""
    from florana.aggregation import METHODS

    states = [get_peft_model_state_dict(m) for m in models]
    out, _ = florana.aggregate(states, "lora_fair", lora_config=LORA, options={"lam": 0.5})
    default, _ = florana.aggregate(states, "lora_fair", lora_config=LORA)
    reference = aggregate_adapters([load_adapter(f) for f in folders], METHODS["lora_fair"].configured(lam=0.5))
    assert all(torch.equal(out[k], v) for k, v in reference.adapter.state_dict().items())
    assert any(not torch.equal(out[k], default[k]) for k in out)
    with pytest.raises(florana.FloranaError, match="fedit takes no options, got lam"):
        florana.aggregate(states, "fedit", lora_config=LORA, options={"lam": 0.5})
    with pytest.raises(florana.FloranaError, match="svd has no option lam; its options: split"):
        florana.aggregate(states, "svd", lora_config=LORA, options={"lam": 0.5})
