"""`florana export`: the merged model and the adapter reproduce the run's final global model, rebuilt through florana
from its last checkpoint (base + global adapter + base delta), and loaded with plain transformers and PEFT."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from florana.cli import app
from florana.config import RunConfig, load_config
from florana.federation.checkpoint import latest_checkpoint
from florana.federation.engine import lora_settings, run
from florana.lora.peft_io import atomic_directory
from florana.train.model import AdapterSlots, load_model
from tiny import arithmetic_jsonl, sentiment_csv, tiny_bert, tiny_bert_bf16, tiny_llama

runner = CliRunner()
TEXTS = ["the film was great and moving", "a dull boring plot", "the cast is superb", "weak clumsy script"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished tiny runs: BERT classification for fedit, flora and fedex, and a Llama causal LM for flora."""
    root = tmp_path_factory.mktemp("export")
    base = dict(model=str(tiny_bert(root)), dataset=str(sentiment_csv(root)), num_clients=3, rounds=2, local_steps=2,
                batch_size=8, test_size=40, client_test_max=10, max_length=16, lora_r=2, lora_alpha=4.0, threads=1,
                bf16=False, lr=2e-2, alpha=1.0)
    out = {m: run(RunConfig(**base, method=m), root / m).run_dir for m in ("fedit", "flora", "fedex")}
    llama = {**base, "model": str(tiny_llama(root)), "dataset": str(arithmetic_jsonl(root)), "task": "causal_lm",
             "text_column": "question", "label_column": "answer", "target_modules": ["q_proj", "v_proj"],
             "test_size": 10, "max_length": 32, "max_new_tokens": 2, "partition": "iid", "rounds": 1}
    out["mixed-fedex"] = run(RunConfig(**{**base, "local_steps": 4, "client_ranks": [2, 4]}, method="fedex"),
                             root / "mixed-fedex").run_dir
    out["bf16-fedex"] = run(RunConfig(**{**base, "model": str(tiny_bert_bf16(root)), "rounds": 1}, method="fedex"),
                            root / "bf16-fedex").run_dir
    out["llama-flora"] = run(RunConfig(**llama, method="flora"), root / "llama-flora").run_dir
    return out


def run_model(run_dir, base_delta=True):
    """The run's final global model through florana: base, the last checkpoint's global adapter and base delta."""
    cfg = load_config(run_dir / "config.toml")
    labels = json.loads((run_dir / "partition.json").read_text())[0]["labels"]
    model, tokenizer = load_model(cfg.task, cfg.model, len(labels), lora_settings(cfg), cfg.seed, dtype=cfg.dtype,
                                  device="cpu")
    slots = AdapterSlots.of(model)
    _, tensors, _ = latest_checkpoint(run_dir)
    slots.write({k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("global::")})
    if base_delta:
        slots.set_base_delta({k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("base_delta::")})
    return model.eval(), tokenizer


@torch.no_grad()
def logits(model, tokenizer):
    return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


def export(*args):
    return runner.invoke(app, ["export", *map(str, args)])


@pytest.mark.parametrize("method", ["fedit", "flora", "fedex", "mixed-fedex"])
def test_merged_model_is_the_runs_final_model(runs, method, tmp_path):
    out = tmp_path / "merged"
    res = export(runs[method], "--merged", out)
    assert res.exit_code == 0, res.output
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()  # plain transformers
    tokenizer = AutoTokenizer.from_pretrained(out)
    reference, ref_tokenizer = run_model(runs[method])
    got, want = logits(model, tokenizer), logits(reference, ref_tokenizer)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.label2id == {"neg": 0, "pos": 1}
    assert "bert.encoder.layer.0.attention.self.query.weight" in load_file(out / "model.safetensors")
    # the trained head is in it: the base checkpoint's head gives other logits
    head = reference.base_model.model.classifier
    assert not torch.equal(model.classifier.weight, head.original_module.weight)
    assert torch.equal(model.classifier.weight, head.modules_to_save["default"].weight)
    if method != "fedit":  # the base change is in it: without it the run's model computes something else
        without, _ = run_model(runs[method], base_delta=False)
        assert (logits(without, ref_tokenizer) - want).abs().max() > 1e-4  # 10x the tolerance (the tiny logits are ~0.05)


def test_merged_model_loads_without_florana(runs, tmp_path):
    out = tmp_path / "merged"
    assert export(runs["fedex"], "--merged", out).exit_code == 0
    script = (f"import sys; sys.modules['florana'] = None\n"  # any import of florana fails
              f"import torch; from safetensors.torch import save_file\n"
              f"from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T\n"
              f"m, t = M.from_pretrained({str(out)!r}).eval(), T.from_pretrained({str(out)!r})\n"
              f"with torch.no_grad(): y = m(**t({TEXTS!r}, padding=True, return_tensors='pt')).logits\n"
              f"save_file({{'logits': y}}, {str(tmp_path / 'y.safetensors')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300)
    want = logits(*run_model(runs["fedex"]))
    assert torch.allclose(load_file(tmp_path / "y.safetensors")["logits"], want, atol=1e-5, rtol=1e-5)


def test_merged_causal_lm(runs, tmp_path):
    out = tmp_path / "merged"
    res = export(runs["llama-flora"], "--merged", out)
    assert res.exit_code == 0, res.output
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    reference, ref_tokenizer = run_model(runs["llama-flora"])
    want = logits(reference, ref_tokenizer)
    assert torch.allclose(logits(model, tokenizer), want, atol=1e-5, rtol=1e-5)
    without, _ = run_model(runs["llama-flora"], base_delta=False)
    assert (logits(without, ref_tokenizer) - want).abs().max() > 1e-4


def test_merged_bf16_base_rounds_once(runs, tmp_path):
    """A bfloat16 base stays bfloat16: each adapted weight is W0 + Δbase + s·B·A summed in float32, rounded once."""
    out = tmp_path / "merged"
    assert export(runs["bf16-fedex"], "--merged", out).exit_code == 0
    merged = load_file(out / "model.safetensors")
    base = load_file(load_config(runs["bf16-fedex"] / "config.toml").model + "/model.safetensors")
    adapter = load_file(runs["bf16-fedex"] / "global_adapter" / "adapter_model.safetensors")
    delta = load_file(runs["bf16-fedex"] / "global_adapter" / "base_update.safetensors")
    key = "bert.encoder.layer.1.attention.self.value"
    lora = adapter[f"base_model.model.{key}.lora_B.weight"] @ adapter[f"base_model.model.{key}.lora_A.weight"]
    want = (base[f"{key}.weight"].float() + delta[f"{key}.weight"].float() + lora * (4.0 / 2)).to(torch.bfloat16)
    assert merged[f"{key}.weight"].dtype == torch.bfloat16 and delta[f"{key}.weight"].abs().max() > 0
    assert torch.equal(merged[f"{key}.weight"], want)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    reference, tokenizer = run_model(runs["bf16-fedex"])
    assert torch.allclose(logits(model, tokenizer).float(), logits(reference, tokenizer).float(), atol=2e-3)


def test_adapter_loads_with_peft(runs, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    res = export(runs["fedit"], "--adapter", out, "--merged", tmp_path / "merged")  # both at once
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    cfg = load_config(runs["fedit"] / "config.toml")
    base = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=2)
    model = PeftModel.from_pretrained(base, out).eval()
    reference, tokenizer = run_model(runs["fedit"])
    assert torch.allclose(logits(model, tokenizer), logits(reference, tokenizer), atol=1e-6)


@pytest.mark.parametrize("method", ["flora", "fedex"])
def test_adapter_refused_where_the_base_changed(runs, method, tmp_path):
    res = export(runs[method], "--adapter", tmp_path / "adapter")
    assert res.exit_code == 2 and "--merged" in res.output and "base" in res.output
    assert not (tmp_path / "adapter").exists()


def test_refusals(runs, tmp_path):
    # not a run folder
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    res = export(tmp_path / "notes", "--merged", tmp_path / "m")
    assert res.exit_code == 2 and "not a florana run folder" in res.output
    # nothing asked
    assert "--adapter OUT and/or --merged OUT" in export(runs["fedit"]).output
    # a foreign non-empty folder is refused and kept
    res = export(runs["fedit"], "--merged", tmp_path / "notes")
    assert res.exit_code == 2 and "a.txt" in res.output
    assert sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["a.txt"]
    assert "holds files" in export(runs["fedit"], "--adapter", tmp_path / "notes").output
    # a folder inside the run is refused (a run's files are deleted by name)
    res = export(runs["fedit"], "--adapter", runs["fedit"] / "exported")
    assert res.exit_code == 2 and "overlaps the run folder" in res.output
    assert not (runs["fedit"] / "exported").exists()
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    assert export(runs["fedit"], "--adapter", tmp_path / "empty").exit_code == 0
    assert (tmp_path / "empty" / "adapter_model.safetensors").is_file()


def test_unfinished_and_quantized_runs(runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["fedit"], unfinished)
    text = (unfinished / "config.toml").read_text()
    (unfinished / "config.toml").write_text(text.replace("rounds = 2", "rounds = 5"))  # extended, not yet run
    res = export(unfinished, "--merged", tmp_path / "m")
    assert res.exit_code == 2 and "not finished (2 of 5 rounds done)" in res.output and "--resume" in res.output
    shutil.rmtree(unfinished / "global_adapter")
    (unfinished / "config.toml").write_text(text)  # stopped before its close
    assert "not finished" in export(unfinished, "--adapter", tmp_path / "a").output
    assert not (tmp_path / "m").exists() and not (tmp_path / "a").exists()
    quantized = tmp_path / "quantized"
    shutil.copytree(runs["fedit"], quantized)
    (quantized / "config.toml").write_text(text.replace('quantization = "none"', 'quantization = "4bit"'))
    assert load_config(quantized / "config.toml").quantization == "4bit"
    res = export(quantized, "--merged", tmp_path / "m")
    assert res.exit_code == 2 and "quantized" in res.output and "--adapter" in res.output
    assert export(quantized, "--adapter", tmp_path / "a").exit_code == 0
    for method, keeps in (("local", "its own adapter"), ("fedsa", "its own B")):  # no global model
        (quantized / "config.toml").write_text(text.replace('method = "fedit"', f'method = "{method}"'))
        res = export(quantized, "--merged", tmp_path / "m")
        assert res.exit_code == 2 and f"a {method} run has no global model" in res.output and keeps in res.output


def test_atomic_directory_any_files(tmp_path):
    """owned=None: a new or empty folder receives everything at once; a non-empty one is left as it was."""
    with atomic_directory(tmp_path / "new", owned=None) as tmp:
        (tmp / "x.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty", owned=None) as tmp:
        (tmp / "y.json").write_text("{}")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["x.json"]
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["y.json"]
    with pytest.raises(OSError):
        with atomic_directory(tmp_path / "new", owned=None) as tmp:
            (tmp / "z.json").write_text("{}")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["x.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]
