"""Adapters saved by PEFT itself → `florana aggregate` → PeftModel.from_pretrained gives the expected weights."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

from florana.cli import app

TARGETS = ["query", "value"]
LAYER = "bert.encoder.layer.{i}.attention.self.{m}"


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """Three clients' adapters, each trained-looking (random factors), saved by PEFT."""
    root = tmp_path_factory.mktemp("peft")
    return [save_client(root / f"client{u}", 100 + u, r=4, lora_alpha=8) for u in range(3)]


def save_client(directory, seed, **lora_fields):
    """A client's adapter saved by PEFT: the same tiny base for all, then factors and head of its own seed."""
    base = tiny_model()  # reseeds: the same base for every client
    torch.manual_seed(seed)  # then each client's own factors (seeding before tiny_model made them all alike)
    model = get_peft_model(base, LoraConfig(target_modules=TARGETS, task_type="SEQ_CLS", init_lora_weights=False,
                                            **lora_fields))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


def client_factors(d):
    return load_file(d / "adapter_model.safetensors")


def expected_delta(dirs, i, m, weights):
    total = 0
    for w, d in zip(weights, dirs):
        t = client_factors(d)
        key = f"base_model.model.{LAYER.format(i=i, m=m)}"
        total = total + w * 2.0 * t[key + ".lora_B.weight"] @ t[key + ".lora_A.weight"]
    return total


def merged_weights(out_dir):
    base = tiny_model()
    update = out_dir / "base_update.safetensors"
    if update.exists():
        with torch.no_grad():
            for key, delta in load_file(update).items():
                base.get_parameter(key).add_(delta)
    model = PeftModel.from_pretrained(base, out_dir).merge_and_unload()
    return dict(model.named_parameters())


@pytest.mark.parametrize("method", ["fedit", "florana", "svd", "flora", "fedex", "lora_fair"])
def test_peft_loads_the_aggregate(clients, tmp_path, method):
    out = tmp_path / "global"
    report = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["aggregate", *map(str, clients), "--method", method, "--out", str(out),
                                   "--weights", "1,2,1", "--report", str(report)])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    for key in ("method", "relative_error", "error_floor", "modules", "bytes_up_per_client",
                "bytes_down_per_client"):
        assert key in rep
    assert len(rep["modules"]) == 4
    base = dict(tiny_model().named_parameters())
    merged = merged_weights(out)
    w = [0.25, 0.5, 0.25]
    for i in range(2):
        for m in TARGETS:
            key = LAYER.format(i=i, m=m) + ".weight"
            delta = merged[key].detach() - base[key].detach()
            ideal = expected_delta(clients, i, m, w)
            err = ((delta - ideal).norm() / ideal.norm()).item()
            assert err == pytest.approx(rep["modules"][f"base_model.model.{LAYER.format(i=i, m=m)}"]
                                        ["relative_error"], abs=1e-4)
            if method in ("flora", "fedex"):
                assert err < 1e-5
    # the classification head (modules_to_save) is the weighted mean of the clients'
    heads = [client_factors(d)["base_model.model.classifier.weight"] for d in clients]
    torch.testing.assert_close(merged["classifier.weight"].detach(), sum(wu * h for wu, h in zip(w, heads)))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == (12 if method == "flora" else 4)


def test_the_round_option_says_which_factor_rolora_froze(clients, tmp_path):
    """These clients trained both factors: as a rolora round 1 their A's must agree, as round 2 their B's."""
    for round_, factor in ((1, "A"), (2, "B"), (3, "A")):
        res = CliRunner().invoke(app, ["aggregate", *map(str, clients), "--method", "rolora", "--round", str(round_),
                                       "--out", str(tmp_path / "out")])
        assert res.exit_code == 2 and f"lora_{factor} differs" in res.output, res.output
        assert f"rolora needs every client to keep the shared frozen {factor}" in res.output


def test_bad_inputs_name_the_culprit_and_write_nothing(clients, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"

    def run(*dirs, method="florana"):
        res = runner.invoke(app, ["aggregate", *map(str, dirs), "--method", method, "--out", str(out)])
        assert res.exit_code == 2, res.output
        assert not out.exists()
        return res.output

    bad = tmp_path / "bad"
    import shutil

    def variant(name, mutate_config=None, mutate_tensors=None):
        d = tmp_path / name
        shutil.copytree(clients[1], d)
        if mutate_config:
            cfg = json.loads((d / "adapter_config.json").read_text())
            mutate_config(cfg)
            (d / "adapter_config.json").write_text(json.dumps(cfg))
        if mutate_tensors:
            t = load_file(d / "adapter_model.safetensors")
            mutate_tensors(t)
            save_file(t, d / "adapter_model.safetensors")
        return d

    q0 = "base_model.model.bert.encoder.layer.0.attention.self.query"
    d = variant("nan", mutate_tensors=lambda t: t[q0 + ".lora_A.weight"].__setitem__((0, 0), float("nan")))
    assert f"{d}: module {q0}: lora_A holds NaN" in run(clients[0], d)
    d = variant("missing", mutate_tensors=lambda t: (t.pop(q0 + ".lora_A.weight"), t.pop(q0 + ".lora_B.weight")))
    assert f"{d}: lacks module {q0}" in run(clients[0], d)
    d = variant("shape", mutate_tensors=lambda t: t.__setitem__(q0 + ".lora_B.weight", torch.zeros(8, 4)))
    assert f"{d}: module {q0}: shape" in run(clients[0], d)
    # a module of another rank is no error: every method here accepts mixed ranks (test_aggregation tests the
    # refusal of a method that would not)
    d = variant("targets", mutate_config=lambda c: c.__setitem__("target_modules", ["query", "key"]))
    assert f"{d}: target_modules" in run(clients[0], d)
    d = variant("basemodel", mutate_config=lambda c: c.__setitem__("base_model_name_or_path", "other/model"))
    assert f"{d}: base_model_name_or_path='other/model' differs" in run(clients[0], d)
    d = variant("corrupt")
    (d / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    assert f"{d / 'adapter_model.safetensors'}: unreadable safetensors file" in run(clients[0], d)
    d = variant("badjson")
    (d / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json: not valid JSON" in run(clients[0], d)
    bad.mkdir()
    (bad / "model.bin").write_bytes(b"pickle?")
    assert f"{bad}: not a PEFT adapter directory" in run(clients[0], bad)
    assert "not a directory" in run(clients[0], tmp_path / "nope")
    res = runner.invoke(app, ["aggregate", "--out", str(out)])
    assert res.exit_code != 0 and not out.exists()
    # a failed run leaves an existing output untouched, even with --force
    shutil.copytree(clients[2], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = runner.invoke(app, ["aggregate", str(clients[0]), str(tmp_path / "nan"), "--out", str(out), "--force"])
    assert res.exit_code == 2 and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("content, message", [
    ([1, 2], "not a LoRA adapter config (a JSON list, not an object)"),
    ("lora", "not a LoRA adapter config (a JSON str, not an object)"),
    ({"peft_type": "IA3"}, "not a LoRA adapter config (peft_type='IA3')"),
    ({"lora_alpha": "16"}, "lora_alpha should be a number, got '16'"),
    ({"lora_alpha": None}, "lora_alpha should be a number, got None"),
    ({"lora_alpha": True}, "lora_alpha should be a number, got True"),
    ({"r": "4"}, "r should be a positive integer, got '4'"),
    ({"r": 0}, "r should be a positive integer, got 0"),
    ({"alpha_pattern": ["query"]}, "alpha_pattern should be an object of module patterns"),
    ({"alpha_pattern": {"query": "x"}}, "alpha_pattern['query'] should be a number, got 'x'"),
    ({"alpha_pattern": {"(query": 4}}, "alpha_pattern: '(query' is not a regular expression"),
    ({"rank_pattern": {"query": 2.5}}, "rank_pattern['query'] should be a positive integer"),
    ({"target_modules": [1, ["query"]]}, "target_modules should be a list of names or a regular expression"),
    ({"target_modules": {"query": 1}}, "target_modules should be a list of names or a regular expression"),
    ({"use_rslora": "yes"}, "use_rslora should be true or false, got 'yes'"),
    ({"fan_in_fan_out": 1}, "fan_in_fan_out should be true or false, got 1"),
    ({"base_model_name_or_path": 7}, "base_model_name_or_path should be a string, got 7"),
    ({"use_dora": True}, "DoRA adapters are not supported"),
])
def test_malformed_adapter_config_is_an_error_naming_the_file(clients, tmp_path, content, message):
    """Whatever adapter_config.json holds, the answer is a clear error naming it, never a traceback."""
    import shutil

    d = tmp_path / "client"
    shutil.copytree(clients[1], d)
    if isinstance(content, dict):
        content = {**json.loads((d / "adapter_config.json").read_text()), **content}
    (d / "adapter_config.json").write_text(json.dumps(content))
    res = CliRunner().invoke(app, ["aggregate", str(clients[0]), str(d), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
    assert f"{d / 'adapter_config.json'}: {message}" in " ".join(res.output.split())


def test_out_never_costs_a_file(clients, tmp_path):
    """--out must be new or empty, or an adapter folder with --force, where only florana's files are replaced;
    a client's folder (or one inside or around it) is refused even with --force."""
    import os
    import stat

    runner = CliRunner()

    def aggregate(out, *flags, method="fedit"):
        return runner.invoke(app, ["aggregate", *map(str, clients), "--method", method, "--out", str(out), *flags])

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    for flags in ([], ["--force"]):
        res = aggregate(notes, *flags)
        assert res.exit_code == 2 and "holds files and is not an adapter folder (todo.txt)" in res.output
    assert [p.name for p in notes.iterdir()] == ["todo.txt"] and (notes / "todo.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "exists and is not a folder" in aggregate(a_file).output and a_file.read_text() == "x"

    before = {d: {p.name: p.read_bytes() for p in d.iterdir()} for d in clients}
    for out in (clients[0], clients[0] / "sub", clients[0].parent):
        res = aggregate(out, "--force")
        assert res.exit_code == 2 and f"overlaps the input adapter folder {clients[0]}" in res.output
    assert {d: {p.name: p.read_bytes() for p in d.iterdir()} for d in clients} == before
    assert not (clients[0] / "sub").exists()

    out = tmp_path / "global"
    assert aggregate(out, method="fedex").exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # like mkdir, not mkdtemp's 0700
    assert (out / "base_update.safetensors").is_file()
    (out / "README.md").write_text("the model card PEFT wrote")
    res = aggregate(out)
    assert res.exit_code == 2 and "already holds an adapter; pass --force" in res.output
    assert (out / "base_update.safetensors").is_file()
    res = aggregate(out, "--force")  # fedit writes no base update: the stale one must not pair with it
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (out / "README.md").read_text() == "the model card PEFT wrote"
    assert aggregate(tmp_path / "fresh").exit_code == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# per client: LoraConfig fields, and the (rank, scaling) PEFT gives query and value
MIXED = [
    (dict(r=2, lora_alpha=4), {"query": (2, 2.0), "value": (2, 2.0)}),
    (dict(r=4, lora_alpha=8, rank_pattern={"query": 2}, alpha_pattern={"query": 6}),
     {"query": (2, 3.0), "value": (4, 2.0)}),
    (dict(r=8, lora_alpha=8, rank_pattern={"value": 6}, alpha_pattern={"value": 12}),
     {"query": (8, 1.0), "value": (6, 2.0)}),
]


@pytest.fixture(scope="module")
def mixed_clients(tmp_path_factory):
    """Three clients of different ranks and scalings, per module too (PEFT's rank_pattern and alpha_pattern)."""
    root = tmp_path_factory.mktemp("peft-mixed")
    return [save_client(root / f"client{u}", 200 + u, **fields) for u, (fields, _) in enumerate(MIXED)]


@pytest.mark.parametrize("method", ["fedit", "fedsa", "hetlora", "flexlora", "florana", "svd", "flora", "fedex"])
def test_peft_loads_a_mixed_rank_aggregate(mixed_clients, tmp_path, method):
    """Clients saved by PEFT at ranks 2/2/8 (query) and 2/4/6 (value) with their own scalings: the global adapter
    has rank 8 for query and 6 for value (flora: 12, the stack), written with rank_pattern/alpha_pattern where
    modules differ, and PeftModel.from_pretrained rebuilds it: the merged update's error against the dense ideal
    is the report's."""
    out, report = tmp_path / "global", tmp_path / "report.json"
    res = CliRunner().invoke(app, ["aggregate", *map(str, mixed_clients), "--method", method, "--out", str(out),
                                   "--weights", "1,2,1", "--report", str(report)])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    saved = load_file(out / "adapter_model.safetensors")
    expect_rank = {"query": 12, "value": 12} if method == "flora" else {"query": 8, "value": 6}
    for i in range(2):
        for m in TARGETS:
            key = f"base_model.model.{LAYER.format(i=i, m=m)}"
            assert saved[key + ".lora_A.weight"].shape[0] == expect_rank[m]
    if method != "flora":
        assert cfg["rank_pattern"] and cfg["alpha_pattern"]  # the two module kinds differ in rank
    base = dict(tiny_model().named_parameters())
    merged = merged_weights(out)  # PeftModel.from_pretrained: a rank it rebuilt wrong would not load
    w = [0.25, 0.5, 0.25]
    for i in range(2):
        for m in TARGETS:
            key = f"base_model.model.{LAYER.format(i=i, m=m)}"
            ideal = sum(wu * spec[m][1] * client_factors(d)[key + ".lora_B.weight"] @
                        client_factors(d)[key + ".lora_A.weight"] for wu, d, (_, spec) in zip(w, mixed_clients, MIXED))
            delta = merged[LAYER.format(i=i, m=m) + ".weight"].detach() - base[LAYER.format(i=i, m=m) + ".weight"]
            err = ((delta.detach() - ideal).norm() / ideal.norm()).item()
            assert err == pytest.approx(rep["modules"][key]["relative_error"], abs=1e-4)
            if method in ("flora", "fedex"):
                assert err < 1e-5
            if method in ("svd", "flexlora"):
                assert err == pytest.approx(rep["modules"][key]["error_floor"], abs=1e-4)
