"""The round loop on tiny models: every method's semantics, outputs, determinism, resume after kill -9,
faults and bad input."""

import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from florana.config import load_config
from florana.errors import FloranaError
from florana.federation import engine
from florana.federation.engine import read_metrics, run
from florana.aggregation import METHODS
from florana.federation.methods import ALL_METHODS, BOUNDS, run_differences
from florana.lora import load_adapter
from tiny import arithmetic_jsonl, sentiment_csv, tiny_bert, tiny_bert_bf16, tiny_config, tiny_llama


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"bert": tiny_bert(root), "bert-bf16": tiny_bert_bf16(root), "llama": tiny_llama(root),
            "csv": sentiment_csv(root), "jsonl": arithmetic_jsonl(root), "root": root}


def strip_timing(history):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in history]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_runs_and_writes_its_outputs(assets, tmp_path, method):
    result = run(tiny_config(assets, method=method), tmp_path / "run")
    history = result.history
    assert [m["round"] for m in history] == [1, 2]
    for m in history:
        assert m["method"] == method
        if method == "fedsa":  # B never leaves a client: there is no global model, and ΔW* is unknown
            assert m["global_accuracy"] is None and m["relative_error"] is None and m["bytes_up"] > 0
        elif method not in ("local",) or m["round"] == 2:
            assert 0.0 <= m["global_accuracy"] <= 1.0
            assert method == "local" or m["global_logit_spread"] > 0  # local's is a mean of personal models
        if method in ("centralized", "local"):
            assert m["relative_error"] is None and m["bytes_up"] == 0
        elif method != "fedsa":
            assert m["relative_error"] >= 0 and m["bytes_up"] > 0 and m["bytes_down"] > 0
            assert m["cum_bytes_up"] >= m["bytes_up"]
            assert all(m[k] > 0 for k in ("norm_A", "fedit_norm_A", "fedit_norm_B"))  # B̂ may be 0 (ffa round 1)
            assert any(k.startswith("florana_") for k in m) == (method == "florana")
        if method != "centralized":
            assert set(m["local_accuracy"]) == {"0", "1", "2"}
    out = tmp_path / "run"
    assert read_metrics(out) == history
    assert (out / "global_adapter" / "adapter_config.json").is_file()
    assert len(list((out / "checkpoints").glob("round-*"))) == 2
    umask = os.umask(0)
    os.umask(umask)
    for folder in (out / "global_adapter", out / "checkpoints" / "round-0002"):  # mkdir's, not mkdtemp's 0700
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    has = {k for m in history for k, v in m.items() if v is not None}  # a panel with nothing to draw is not written
    panels = {"bytes.png"} | ({"accuracy.png", "accuracy_mib.png"} if "global_accuracy" in has else set())
    panels |= ({"error.png"} if "relative_error" in has else set())
    panels |= ({"spread.png"} if "global_logit_spread" in has else set())
    assert {p.name for p in (out / "plots").glob("*.png")} == panels
    assert method in ("fedsa", "centralized", "local") or len(list((out / "plots").glob("*.png"))) == 5
    assert json.loads((out / "partition.json").read_text())[0]["size"] > 0
    has_base_update = (out / "global_adapter" / "base_update.safetensors").exists()
    assert has_base_update == (method in ("flora", "fedex"))
    if method in ("flora", "fedex", "ffa", "rolora", "fedsvd"):
        exact_error = [m["relative_error"] for m in history]
        assert max(exact_error) < 1e-5  # exact methods are exact inside the real loop too


def test_method_semantics(assets, tmp_path):
    """ffa keeps the initial A; fedsa's clients keep their own B; flora's global LoRA restarts at B = 0."""
    cfg = tiny_config(assets)
    ffa = engine.Federation(cfg.with_overrides(method="ffa"))
    A0 = {k: v for k, v in ffa.global_tensors.items() if ".lora_A." in k}
    for r in (1, 2):
        ffa.round(r)
    assert all(torch.equal(ffa.global_tensors[k], v) for k, v in A0.items())
    assert any(not torch.equal(ffa.global_tensors[k.replace("lora_A", "lora_B")], torch.zeros_like(
        ffa.global_tensors[k.replace("lora_A", "lora_B")])) for k in A0)

    fedsa = engine.Federation(cfg.with_overrides(method="fedsa"))
    fedsa.round(1)
    assert set(fedsa.personal) == {0, 1, 2}
    B_keys = [k for k in fedsa.global_tensors if ".lora_B." in k]
    assert not torch.equal(fedsa.personal[0][B_keys[0]], fedsa.personal[1][B_keys[0]])
    start = fedsa.client_start(1, 2)
    assert torch.equal(start[B_keys[0]], fedsa.personal[1][B_keys[0]])

    flora = engine.Federation(cfg.with_overrides(method="flora"))
    before = {m: flora.slots.base_weight(m).clone() for m in flora.modules}
    flora.round(1)
    # the merge lives in the float32 base delta the model adds, never rounded into the base weights
    assert all(torch.equal(flora.slots.base_weight(m), before[m]) for m in flora.modules)
    assert set(flora.slots.base_delta) == set(flora.modules)
    assert all(d.dtype == torch.float32 and bool(d.any()) for d in flora.slots.base_delta.values())
    assert all(bool((v == 0).all()) for k, v in flora.global_tensors.items() if ".lora_B." in k)


def effective_weights(fed) -> dict[str, torch.Tensor]:
    """W0 + base delta + s·B·A of every adapted module in float64, from the federation's state (nn.Linear: the
    base weight is laid out as ΔW)."""
    out = {}
    for m in fed.modules:
        W = fed.slots.base_weight(m).double()
        if m in fed.slots.base_delta:
            W = W + fed.slots.base_delta[m].double()
        B, A = fed.global_tensors[f"{m}.lora_B.weight"], fed.global_tensors[f"{m}.lora_A.weight"]
        out[m] = W + fed.slots.scaling(m, fed.rank) * (B.double() @ A.double())
    return out


@pytest.mark.parametrize("model", ["bert", "bert-bf16"])
@pytest.mark.parametrize("method", ["flora", "fedex", "ffa", "rolora", "fedsvd"])
def test_exact_methods_are_exact_inside_the_loop(assets, method, model, monkeypatch):
    """After each round the model's effective weight W0 + ΔW moved by exactly Σ_u w_u s_u B_u A_u of the clients'
    trained factors, computed here densely from what they trained, on a float32 and a bfloat16 base model."""
    cfg = tiny_config(assets, method=method, model=str(assets[model]), weighting="examples", rounds=2)
    fed = engine.Federation(cfg)
    assert fed.slots.base_weight(fed.modules[0]).dtype == (torch.bfloat16 if model == "bert-bf16" else torch.float32)
    trained = {}
    real = engine.Federation.train_client

    def record(self, start, data, steps, seed, dp_client=None):
        loss, tensors = real(self, start, data, steps, seed, dp_client)
        u = next(u for u, c in enumerate(self.data.clients) if c.train is data)
        trained[u] = (start, tensors)
        return loss, tensors

    monkeypatch.setattr(engine.Federation, "train_client", record)
    starts = []
    for r in (1, 2):
        before = effective_weights(fed)
        base_before = {m: fed.slots.base_weight(m).double() + fed.slots.base_delta.get(m, 0) for m in fed.modules}
        trained.clear()
        metrics = fed.round(r)
        after = effective_weights(fed)
        sizes = {u: fed.data.clients[u].size for u in trained}
        s = cfg.lora_alpha / cfg.lora_r  # 2: a wrong scale would show
        for m in fed.modules:
            ideal = sum(sizes[u] / sum(sizes.values()) * s * (t[f"{m}.lora_B.weight"].double() @
                                                                t[f"{m}.lora_A.weight"].double())
                        for u, (_, t) in trained.items())
            # every client trained on W0 + base delta + its own LoRA: that sum is what the round aggregates
            moved = after[m] - base_before[m]
            assert ((moved - ideal).norm() / ideal.norm()).item() < 1e-5, (m, r)
            assert not torch.equal(after[m], before[m])
        assert metrics["relative_error"] < 1e-5
        starts.append({u: st for u, (st, _) in trained.items()})
    if method == "flora":  # a fresh LoRA every round and for every client: new A, zero B
        a_key = next(k for k in starts[0][0] if ".lora_A." in k)
        assert not torch.equal(starts[0][0][a_key], starts[1][0][a_key])
        assert not torch.equal(starts[0][0][a_key], starts[0][1][a_key])
        assert all(bool((v == 0).all()) for st in starts for c in st.values() for k, v in c.items() if ".lora_B." in k)


def test_rounds_train_and_send_what_the_method_says(assets, monkeypatch):
    """rolora trains B in odd rounds (A frozen at its shared value) and A in even ones, uploading only the trained
    factor; fedsvd trains B only and re-factors after every fedsvd_period-th round (A gets orthonormal rows)."""
    cfg = tiny_config(assets, rounds=4)
    trained = []
    real = engine.train_steps

    def record(model, params, *args, **kw):
        names = {id(p): k for k, p in fed.slots.params.items()}
        trained.append({"A" if ".lora_A." in names[id(p)] else "B" if ".lora_B." in names[id(p)] else "head"
                        for p in params})
        return real(model, params, *args, **kw)

    monkeypatch.setattr(engine, "train_steps", record)
    fed = engine.Federation(cfg.with_overrides(method="rolora"))
    keys = {f: [k for k in fed.initial if f".lora_{f}." in k] for f in "AB"}
    before = dict(fed.global_tensors)
    for r in (1, 2, 3, 4):
        trained.clear()
        fed.round(r)
        moved = {f: any(not torch.equal(fed.global_tensors[k], before[k]) for k in keys[f]) for f in "AB"}
        expect = "B" if r % 2 else "A"
        assert moved == {"A": expect == "A", "B": expect == "B"}, r
        assert all(t == {expect, "head"} for t in trained), (r, trained)
        assert set(fed.local_update(0, fed.client_start(0, r), r)[0].tensors) == \
            set(keys[expect]) | {k for k in fed.initial if ".lora_" not in k}
        before = dict(fed.global_tensors)

    fed = engine.Federation(cfg.with_overrides(method="fedsvd", fedsvd_period=2))
    A0 = {k: fed.global_tensors[k] for k in keys["A"]}
    for r in (1, 2, 3):
        trained.clear()
        fed.round(r)
        assert all(t == {"B", "head"} for t in trained)
        same_A = all(torch.equal(fed.global_tensors[k], A0[k]) for k in keys["A"])
        assert same_A == (r != 2), r  # re-factored after round 2 only; round 3 keeps round 2's A
        if r >= 2:
            for k in keys["A"]:
                A = fed.global_tensors[k].double()
                torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        if r == 2:
            A0 = {k: fed.global_tensors[k] for k in keys["A"]}


@pytest.mark.parametrize("method", ["rolora", "fedsvd"])
def test_the_ledger_books_the_factors_clients_missed(assets, method):
    """rolora sends the round's frozen factor, fedsvd B (and A after a re-factoring); a client that missed rounds
    also gets every factor that changed since it last downloaded. Checked against a count of what each sampled
    client lacks, round by round, with half the clients sampled."""
    cfg = tiny_config(assets, method=method, num_clients=4, rounds=6, sample_fraction=0.5, fedsvd_period=2)
    fed = engine.Federation(cfg)
    nbytes = lambda keys: sum(fed.initial[k].numel() * 4 for k in keys)  # noqa: E731 (float32 throughout)
    size = {f: nbytes(k for k in fed.initial if f".lora_{f}." in k) for f in "AB"}
    head = nbytes(k for k in fed.initial if ".lora_" not in k)
    last_down, changed, caught_up = {}, {}, 0
    for r in range(1, 7):
        sampled, _ = fed.sample(r)
        if method == "rolora":
            sent = {"A" if r % 2 else "B"}
        else:
            sent = {"B", "A"} if r > 1 and (r - 1) % 2 == 0 else {"B"}
        expected = 0
        for u in sampled:
            lacks = {f for f, at in changed.items() if at >= last_down.get(u, 0)}
            caught_up += bool(lacks - sent)
            expected += head + sum(size[f] for f in sent | lacks)
            last_down[u] = r
        metrics = fed.round(r)
        assert metrics["bytes_down"] == expected, r
        up = {"A"} if method == "rolora" and r % 2 == 0 else {"B"}
        assert metrics["bytes_up"] == len(sampled) * (head + sum(size[f] for f in up))
        changes = up | ({"A"} if method == "fedsvd" and r % 2 == 0 else set())
        changed.update({f: r for f in changes})
    assert caught_up > 0, "this seed should make some client catch up"


@pytest.mark.parametrize("method", ["flora", "fedex"])
def test_the_ledger_books_the_base_changes_clients_missed(assets, method):
    """With half the clients sampled, a client gets the last round's base change if it took part in the round
    before (flora's stacked factors; fedex's residual as factors, here smaller than d×k), the whole base delta if it
    missed more, nothing in round 1; it uploads its whole adapter."""
    cfg = tiny_config(assets, method=method, num_clients=4, rounds=5, sample_fraction=0.5)
    fed = engine.Federation(cfg)
    nbytes = lambda keys: sum(fed.initial[k].numel() * 4 for k in keys)  # noqa: E731 (float32 throughout)
    shared = nbytes(k for k in fed.initial if method == "fedex" or ".lora_" not in k)  # flora: the head only
    dims = {m: (fed.initial[f"{m}.lora_B.weight"].shape[0], fed.initial[f"{m}.lora_A.weight"].shape[1])
            for m in fed.modules}
    total = sum(d * k * 4 for d, k in dims.values())
    last_round, change, kinds = {}, 0, set()
    for r in range(1, 6):
        sampled, _ = fed.sample(r)
        metrics = fed.round(r)
        expected = 0
        for u in sampled:
            seen = last_round.get(u, 1 if r == 2 else None)  # before round 1 everyone holds the original base
            kind = "none" if r == 1 else "change" if seen == r - 1 else "total"
            kinds.add(kind)
            expected += shared + {"none": 0, "change": change, "total": total}[kind]
            last_round[u] = r
        assert metrics["bytes_down"] == expected, r
        assert metrics["bytes_up"] == len(sampled) * nbytes(fed.initial)
        rank = cfg.lora_r * (len(sampled) - len(metrics["rejected"]))  # flora's stacked rank this round
        # fedex's residual has rank ≤ that stack + r: it travels as those factors where they are smaller than d×k
        change = sum(min(d * k, (rank + cfg.lora_r) * (d + k)) * 4 for d, k in dims.values()) if method == "fedex" \
            else sum((d + k) * rank * 4 for d, k in dims.values())
    assert kinds == {"none", "change", "total"}


def test_the_base_delta_is_what_the_model_computes_with(assets):
    """A module's output is x·(W0 + base delta)ᵀ + bias + its LoRA path: the hook adds the float32 delta."""
    fed = engine.Federation(tiny_config(assets, method="fedex"))
    fed.round(1)
    m = fed.modules[0]
    layer = fed.model.get_submodule(m)
    x = torch.randn(5, fed.slots.base_weight(m).shape[1])
    fed.slots.write(fed.global_tensors)
    W = effective_weights(fed)[m]
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), x.double() @ W.T + layer.base_layer.bias.double(),
                                   rtol=1e-5, atol=1e-5)


def test_error_feedback_in_the_loop(assets, tmp_path):
    """Round 1 applies the method's own answer (nothing to feed back yet); every round reports the residual's norm,
    and the checkpoint carries the residual of every module."""
    cfg = tiny_config(assets, method="fedit", rounds=3)
    plain = run(cfg, tmp_path / "plain").history
    fed = run(cfg.with_overrides(error_feedback=True), tmp_path / "fed").history
    feedback_keys = {"feedback_norm", "feedback_relative", "feedback_dropped"}
    assert {k: v for k, v in fed[0].items() if k not in feedback_keys | {"seconds"}} == strip_timing(plain)[0]
    assert fed[1]["global_accuracy"] != plain[1]["global_accuracy"] or fed[1]["relative_error"] != \
        plain[1]["relative_error"]
    for m in fed:
        assert m["feedback_norm"] > 0 and 0 < m["feedback_relative"] < 2 and m["feedback_dropped"] >= 0
    assert all(k not in m for m in plain for k in feedback_keys)
    state = load_file(tmp_path / "fed" / "checkpoints" / "round-0003" / "state.safetensors")
    fed_modules = engine.Federation(cfg).modules
    assert {k for k in state if k.startswith("feedback::")} == {f"feedback::{m}::{f}" for m in fed_modules
                                                               for f in "AB"}


@pytest.mark.parametrize("method", ["hetlora", "flexlora"])
def test_error_feedback_with_mixed_ranks_in_the_loop(assets, tmp_path, method):
    """Clients of ranks 2 and 4: the residual is kept at the global rank (4), round 1 is the method's own answer,
    the wire is the plain run's to the byte (each client still downloads its first r_u components)."""
    cfg = tiny_config(assets, method=method, rounds=3, client_ranks=[2, 4], sample_fraction=0.67)
    plain = run(cfg, tmp_path / "plain").history
    fed = run(cfg.with_overrides(error_feedback=True), tmp_path / "fed").history
    feedback_keys = {"feedback_norm", "feedback_relative", "feedback_dropped"}
    assert {k: v for k, v in fed[0].items() if k not in feedback_keys | {"seconds"}} == strip_timing(plain)[0]
    assert [m["bytes_down"] for m in fed] == [m["bytes_down"] for m in plain]
    assert [m["bytes_up"] for m in fed] == [m["bytes_up"] for m in plain]
    for m in fed:
        assert m["feedback_norm"] > 0 and 0 < m["feedback_relative"] < 2 and m["feedback_dropped"] >= 0
    state = load_file(tmp_path / "fed" / "checkpoints" / "round-0003" / "state.safetensors")
    residual = [v for k, v in state.items() if k.startswith("feedback::") and k.endswith("::A")]
    assert residual and all(v.shape[0] == 4 for v in residual)


def test_same_seed_same_numbers(assets, tmp_path):
    cfg = tiny_config(assets, method="florana", sample_fraction=0.67, weighting="examples")
    a = run(cfg, tmp_path / "a").history
    b = run(cfg, tmp_path / "b").history
    assert strip_timing(a) == strip_timing(b)
    assert all(len(m["clients"]) == 2 for m in a)
    c = run(cfg.with_overrides(seed=1), tmp_path / "c").history
    assert strip_timing(a) != strip_timing(c)


@pytest.mark.parametrize("method, overrides", [
    ("fedex", {}),
    ("fedsa", {}),  # each client's personal B is in the checkpoint
    ("flora", {"sample_fraction": 0.67}),  # the base delta, the last change and who holds which base
    ("florana", {}),
    ("rolora", {"sample_fraction": 0.67}),  # which round each client last downloaded at, when factors changed
    ("svd", {"error_feedback": True}),  # the residual carried into the next round
])
def test_resume_after_kill_minus_9(assets, tmp_path, method, overrides):
    cfg = tiny_config(assets, method=method, rounds=6, **overrides)
    reference = run(cfg, tmp_path / "ref").history
    (tmp_path / "cfg.toml").write_text(cfg.to_toml())
    run_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "florana", "run", "--config", str(tmp_path / "cfg.toml"),
                             "--out", str(run_dir), "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoints" / "round-0002").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # metrics.jsonl is written just after each checkpoint, so a kill in between leaves it a round behind
    done = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("round-*"))
    assert 2 <= done < 6 and len(read_metrics(run_dir)) in (done - 1, done)
    resumed = run(None, run_dir, resume=True).history
    assert strip_timing(resumed) == strip_timing(reference)
    for name in ("adapter_model.safetensors", "base_update.safetensors"):
        ref_file, got_file = tmp_path / "ref" / "global_adapter" / name, run_dir / "global_adapter" / name
        assert ref_file.is_file() == got_file.is_file() == (name == "adapter_model.safetensors" or
                                                             method in ("flora", "fedex"))
        if ref_file.is_file():
            ref, got = load_file(ref_file), load_file(got_file)
            assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def assert_same_adapter(a, b):
    for name in ("adapter_model.safetensors", "base_update.safetensors"):
        assert (a / name).exists() == (b / name).exists()
        if (a / name).exists():
            ta, tb = load_file(a / name), load_file(b / name)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("method", ["fedex", "fedsa"])
def test_more_rounds_extend_a_finished_run_as_if_it_had_never_stopped(assets, tmp_path, method):
    """fedex carries base weights in its checkpoint, fedsa each client's B: both must survive the extension."""
    cfg = tiny_config(assets, method=method, rounds=4)
    reference = run(cfg, tmp_path / "ref").history
    run(cfg.with_overrides(rounds=2), tmp_path / "run")
    extended = run(cfg, tmp_path / "run", resume=True).history
    assert strip_timing(extended) == strip_timing(reference)
    assert read_metrics(tmp_path / "run") == extended
    assert load_config(tmp_path / "run" / "config.toml") == cfg
    assert_same_adapter(tmp_path / "run" / "global_adapter", tmp_path / "ref" / "global_adapter")
    # the newest keep_checkpoints (2) checkpoints stay, older ones go
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["round-0003", "round-0004"]


@pytest.mark.parametrize("method", ["fedsa", "flexlora"])
def test_a_mixed_rank_run_extends_as_if_it_had_never_stopped(assets, tmp_path, method):
    """The checkpoint holds the global adapter at the largest rank and each fedsa client's own B at its rank."""
    cfg = tiny_config(assets, method=method, rounds=3, client_ranks=[2, 4])
    reference = run(cfg, tmp_path / "ref").history
    run(cfg.with_overrides(rounds=2), tmp_path / "run")
    extended = run(cfg, tmp_path / "run", resume=True).history
    assert strip_timing(extended) == strip_timing(reference)
    assert_same_adapter(tmp_path / "run" / "global_adapter", tmp_path / "ref" / "global_adapter")


def test_a_resumed_run_keeps_its_config(assets, tmp_path):
    cfg = tiny_config(assets, rounds=1)
    run(cfg, tmp_path / "run")
    stored = (tmp_path / "run" / "config.toml").read_text()
    for requested, message in [
        (cfg.with_overrides(seed=1, lr=1e-3), "lr 0.005 → 0.001, seed 0 → 1 differ(s) from its config.toml"),
        (cfg.with_overrides(seed=1, rounds=3), "seed 0 → 1 differ(s) from its config.toml"),
    ]:
        with pytest.raises(FloranaError, match=re.escape(f"{tmp_path / 'run'}: a resumed run keeps its config, but "
                                                         + message)):
            run(requested, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "config.toml").read_text() == stored
    run(cfg.with_overrides(rounds=3), tmp_path / "run", resume=True)
    assert load_config(tmp_path / "run" / "config.toml") == cfg.with_overrides(rounds=3)
    with pytest.raises(FloranaError, match=r"3 round\(s\) are done; rounds=2 cannot extend the run"):
        run(cfg.with_overrides(rounds=2), tmp_path / "run", resume=True)
    local = tiny_config(assets, method="local", rounds=1)
    run(local, tmp_path / "local")
    with pytest.raises(FloranaError, match="a finished local run cannot be extended"):
        run(local.with_overrides(rounds=2), tmp_path / "local", resume=True)


def test_another_methods_option_does_not_stop_a_resume(assets, tmp_path):
    """A fedit run made before florana's default λ changed resumes (and compare reuses it) under the new default:
    florana_prox changes nothing fedit computes. A florana run with another λ is another run."""
    cfg = tiny_config(assets, method="fedit", rounds=1, florana_prox=0.0, svd_split="b")
    run(cfg, tmp_path / "fedit")
    later = cfg.with_overrides(rounds=2, florana_prox=10.0, svd_split="client_norm")
    assert run_differences(cfg, later) == {"rounds": (1, 2)}
    run(later, tmp_path / "fedit", resume=True)
    assert load_config(tmp_path / "fedit" / "config.toml") == later
    ours = cfg.with_overrides(method="florana")
    assert run_differences(ours, ours.with_overrides(florana_prox=10.0, svd_split="client_norm")) == {
        "florana_prox": (0.0, 10.0)}
    run(ours, tmp_path / "florana")
    with pytest.raises(FloranaError, match=re.escape("florana_prox 0.0 → 10.0 differ(s) from its config.toml")):
        run(ours.with_overrides(rounds=2, florana_prox=10.0), tmp_path / "florana", resume=True)


def test_only_the_newest_checkpoints_are_kept(assets, tmp_path):
    history = run(tiny_config(assets, rounds=3, keep_checkpoints=1), tmp_path / "run").history
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["round-0003"]
    assert read_metrics(tmp_path / "run") == history


def test_pruning_removes_only_checkpoint_files(tmp_path):
    from florana.federation.checkpoint import latest_round, prune_checkpoints

    folder = tmp_path / "checkpoints"
    for r in (1, 2, 3, 4):
        (folder / f"round-{r:04d}").mkdir(parents=True)
        for name in ("state.safetensors", "state.json"):
            (folder / f"round-{r:04d}" / name).write_text("x")
    (folder / "round-0001" / "notes.txt").write_text("mine")
    (folder / "other").mkdir()
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in folder.iterdir()) == ["other", "round-0001", "round-0003", "round-0004"]
    assert [p.name for p in (folder / "round-0001").iterdir()] == ["notes.txt"]
    assert latest_round(tmp_path) == 4


def test_checkpoints_and_metrics_reach_the_disk_before_they_replace_anything(tmp_path, monkeypatch):
    """A rename survives a crash of the machine only when what it moves was flushed to the disk before it and the
    folder it lands in after it; else the newest checkpoint may come back empty and the run cannot resume from it."""
    from pathlib import Path

    from florana.federation.checkpoint import latest_checkpoint, save_checkpoint, write_text_atomic

    events, opened = [], {}
    real_open, real_fsync, real_rename, real_replace = os.open, os.fsync, os.rename, os.replace

    def open_(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = Path(path)
        return fd

    def fsync(fd):
        events.append(("fsync", opened.get(fd)))
        real_fsync(fd)

    def moving(real):
        def move(src, dst):
            real(src, dst)
            events.append(("move", Path(src), Path(dst)))
        return move

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", moving(real_rename))
    monkeypatch.setattr(os, "replace", moving(real_replace))
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"round": 1})  # a new folder, renamed into place
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"round": 1})  # an existing one: file by file
    write_text_atomic(tmp_path / "metrics.jsonl", "{}\n")
    moves = [i for i, e in enumerate(events) if e[0] == "move"]
    assert len(moves) == 1 + 2 + 1
    for i in moves:
        _, src, dst = events[i]
        flushed = {e[1] for e in events[:i] if e[0] == "fsync"}
        moved = {src} | {src / p.relative_to(dst) for p in dst.rglob("*")}
        assert moved <= flushed, f"{sorted(moved - flushed)} not on the disk before {src} → {dst}"
        assert ("fsync", dst.parent) in events[i + 1:], f"{dst.parent} not flushed after {src} → {dst}"
    assert latest_checkpoint(tmp_path)[1]["w"].tolist() == [0.0, 0.0]
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_where_a_new_run_may_go(tmp_path):
    from florana.federation.folders import check_run_folder

    def folder(name, *entries):
        d = tmp_path / name
        d.mkdir()
        for e in entries:
            (d / e).mkdir() if e.startswith(".flower") else (d / e).write_text("x")
        return d

    for ok in (tmp_path / "new", folder("empty"), folder("failed", "run.log", ".config.toml.tmp7"),
               folder("loopback", ".flower")):
        check_run_folder(ok)
    for refused, listing in ((folder("mine", "config.toml"), "config.toml"),
                             (folder("notes", "run.log", "notes.txt"), "notes.txt"),
                             (folder("hidden", ".flower", "data.csv"), "data.csv")):
        with pytest.raises(FloranaError, match=re.escape(f"{refused}: holds files that are not a florana run's "
                                                         f"({listing})")):
            check_run_folder(refused)
    with pytest.raises(FloranaError, match="exists and is not a folder"):
        check_run_folder(tmp_path / "mine" / "config.toml")


def test_removing_a_run_removes_only_what_a_run_writes(tmp_path):
    from florana.federation.folders import remove_run

    run_dir = tmp_path / "run"
    files = ["config.toml", "metrics.jsonl", "run.log", "partition.json", "global_adapter/adapter_config.json",
             "global_adapter/adapter_model.safetensors", "checkpoints/round-0002/state.json",
             "checkpoints/.round-0003.ab12/state.safetensors", "plots/accuracy.png", ".metrics.jsonl.tmp42",
             "sessions.jsonl", "plots/accuracy_mib.png", "paired.csv", "provenance.json"]
    for name in files + ["global_adapter/README.md", "plots/mine.png"]:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("x")
    remove_run(run_dir)
    left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert left == ["global_adapter", "global_adapter/README.md", "plots", "plots/mine.png"]
    (run_dir / "global_adapter" / "README.md").unlink()
    (run_dir / "plots" / "mine.png").unlink()
    remove_run(run_dir)
    assert not run_dir.exists()


def test_nan_client_is_rejected_and_the_run_goes_on(assets, tmp_path, monkeypatch):
    real = engine.train_steps
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        loss = real(*args, **kw)
        return math.nan if calls["n"] == 2 else loss  # the second client trained in round 1

    monkeypatch.setattr(engine, "train_steps", flaky)
    history = run(tiny_config(assets, method="florana"), tmp_path / "run").history
    assert history[0]["rejected"] == [1] and history[1]["rejected"] == []
    assert "1" not in history[0]["local_accuracy"]
    assert "client 1's update rejected" in (tmp_path / "run" / "run.log").read_text()


def test_non_finite_factors_are_rejected(assets, tmp_path, monkeypatch):
    real = engine.Federation.train_client

    def poisoned(self, start, data, steps, seed, dp_client=None):
        loss, tensors = real(self, start, data, steps, seed, dp_client)
        if data is self.data.clients[0].train:
            key = next(k for k in tensors if ".lora_B." in k)
            tensors[key][0, 0] = float("inf")
        return loss, tensors

    monkeypatch.setattr(engine.Federation, "train_client", poisoned)
    history = run(tiny_config(assets, method="svd"), tmp_path / "run").history
    assert all(m["rejected"] == [0] for m in history)
    assert all(math.isfinite(m["relative_error"]) for m in history)


def test_the_server_rejects_non_finite_updates_whoever_sent_them(assets, tmp_path, monkeypatch):
    """A remote client may skip its own check (or lie): close_round checks every update again."""
    real = engine.Federation.local_update

    def unchecked(self, u, start, round_):
        result, kept = real(self, u, start, round_)
        if u == 2:
            key = next(k for k in result.tensors if ".lora_A." in k)
            result.tensors[key][0, 0] = float("nan")
        return result, kept

    monkeypatch.setattr(engine.Federation, "local_update", unchecked)
    history = run(tiny_config(assets, method="florana"), tmp_path / "run").history
    assert all(m["rejected"] == [2] and "2" not in m["local_accuracy"] for m in history)
    upload = sum(t.numel() * 4 for t in engine.Federation(tiny_config(assets)).initial.values())
    assert all(m["bytes_up"] == 3 * upload for m in history)  # the rejected upload crossed the wire too
    assert all(math.isfinite(m["relative_error"]) for m in history)


def test_client_without_data_is_skipped_and_counted(assets, tmp_path):
    # a Dirichlet α this small hands (nearly) all of a class to one client, leaving others empty
    cfg = tiny_config(assets, partition="dirichlet", alpha=0.01, num_clients=6, seed=3)
    history = run(cfg, tmp_path / "run").history
    assert history[0]["skipped_empty"], "this seed should leave a client empty"
    assert not set(history[0]["skipped_empty"]) & set(history[0]["clients"])


@pytest.mark.parametrize("overrides, message", [
    ({"model": "no/such-model-anywhere"}, "unknown model 'no/such-model-anywhere'"),
    ({"dataset": "no_such_dataset_xyz"}, "unknown dataset 'no_such_dataset_xyz'"),
    ({"text_column": "review"}, "no column 'review'"),
    ({"num_clients": 500}, "num_clients=500 exceeds"),
    ({"target_modules": ["q_proj"]}, "target_modules"),
    ({"target_modules": ["query", "word_embeddings"]}, "'bert.embeddings.word_embeddings' is an embedding layer"),
])
def test_bad_input_is_a_clear_error(assets, tmp_path, overrides, message):
    with pytest.raises(FloranaError, match=message):
        run(tiny_config(assets, **overrides), tmp_path / "run")


def test_existing_run_folder_is_not_overwritten(assets, tmp_path):
    run(tiny_config(assets, rounds=1), tmp_path / "run")
    with pytest.raises(FloranaError, match="already holds a run"):
        run(tiny_config(assets, rounds=1), tmp_path / "run")
    with pytest.raises(FloranaError, match="nothing to resume"):
        run(None, tmp_path / "empty", resume=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("my own notes")
    with pytest.raises(FloranaError, match=re.escape(f"{mine}: holds files that are not a florana run's "
                                                     "(config.toml)")):
        run(tiny_config(assets, rounds=1), mine)
    assert (mine / "config.toml").read_text() == "my own notes" and len(list(mine.iterdir())) == 1
    # what a run that failed before its first round leaves is no obstacle
    with pytest.raises(FloranaError, match="no column 'review'"):
        run(tiny_config(assets, rounds=1, text_column="review"), tmp_path / "failed")
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == [".lock", "run.log"]  # its lock is free
    assert run(tiny_config(assets, rounds=1), tmp_path / "failed").history


def test_causal_lm_round_trip(assets, tmp_path):
    cfg = tiny_config(assets, task="causal_lm", model=str(assets["llama"]), dataset=str(assets["jsonl"]),
                      text_column="question", label_column="answer", target_modules=["q_proj", "v_proj"],
                      test_size=10, max_length=32, max_new_tokens=4, partition="iid", method="florana")
    history = run(cfg, tmp_path / "run").history
    assert all(0.0 <= m["global_accuracy"] <= 1.0 for m in history)
    assert all(m["global_loss"] > 0 for m in history)
    assert history[-1]["relative_error"] is not None


def test_final_number_scoring():
    from florana.train.tasks import final_number

    assert final_number("so 12 + 30 = 42.") == "42"
    assert final_number("The answer is 1,250") == "1250"
    assert final_number("no digits") is None
    assert final_number("3.50") == "3.5"


def test_exact_match_of_numbers_and_of_stated_answers():
    """Numbers compare as numbers (the completion's final one); other answers as the stated text, exactly."""
    from florana.train.tasks import same_answer

    assert same_answer(" The answer is 1,250.", "1250") and same_answer("-4", "-4")
    assert not same_answer(" The answer is 1,251.", "1250") and not same_answer("no idea", "7")
    assert same_answer(" The answer is Friday.", "Friday") and same_answer("Friday\nbecause", "Friday")
    assert same_answer("the answer is: go, hundred.\n", "go, hundred")
    assert not same_answer(" The answer is Friday.", "Thursday") and not same_answer("It is Friday.", "Friday")
    assert not same_answer(" The answer is friday.", "Friday")  # character for character, as reasoning-gym's scorer
    assert same_answer(" The answer is 138/583.", "138/583") and not same_answer("The answer is 583.", "138/583")


def test_majority_accuracy_answers_the_training_datas_most_frequent_answer():
    """The share of held-out answers equal to the training data's most frequent one (a tie: the smallest), with
    the task's own comparison; nothing to score or to learn from: none."""
    from florana.train.tasks import majority_accuracy, same_answer

    assert majority_accuracy([1, 1, 0], [1, 0, 0, 0]) == 0.25
    assert majority_accuracy([1, 0, 1, 0], [0, 0, 1]) == pytest.approx(2 / 3)  # a tie goes to class 0
    assert majority_accuracy(["1,250", "7", "1,250"], ["1250", "7"], same_answer) == 0.5
    assert majority_accuracy([], [1]) is None and majority_accuracy([1], []) is None


@pytest.mark.parametrize("method", ["fedit", "local", "fedsa"])
def test_local_accuracy_comes_with_each_clients_own_majority_floor(assets, tmp_path, method):
    """Each scored client's local_majority is the share of its held-out part in its training part's majority class,
    counted here from the same split; local_majority_mean is their mean over the clients local accuracy averages."""
    cfg = tiny_config(assets, method=method, alpha=0.5, num_clients=4)
    history = run(cfg, tmp_path / "run").history
    clients = engine.Federation(cfg).data.clients
    expected = {}
    for u, client in enumerate(clients):
        counts = torch.bincount(torch.tensor(client.train.targets))
        expected[str(u)] = sum(t == int(counts.argmax()) for t in client.test.targets) / len(client.test)
    assert len({round(v, 6) for v in expected.values()}) > 1  # a skewed split: the floors differ
    for m in history:
        assert m["local_majority"] == pytest.approx(expected)
        assert m["local_majority_mean"] == pytest.approx(sum(expected.values()) / len(expected))
        assert set(m["local_majority"]) == set(m["local_accuracy"])


# ---- clients of different ranks ------------------------------------------------------------------------
def lora_bytes(fed, r, factors=("A", "B")):
    """Bytes of one client's LoRA factors at rank r (float32), over all modules."""
    total = 0
    for m in fed.modules:
        d, k = fed.initial[f"{m}.lora_B.weight"].shape[0], fed.initial[f"{m}.lora_A.weight"].shape[1]
        total += 4 * r * ((k if "A" in factors else 0) + (d if "B" in factors else 0))
    return total


def test_a_client_trains_exactly_a_lora_of_its_own_rank(assets):
    """A rank-2 client in the run's rank-4 model trains what a PEFT model of rank 2 trains from the same start on
    the same batches: its first 2 slots at scaling α/2, the other 2 zero before and after (weight decay and LoRA
    dropout included)."""
    cfg = tiny_config(assets, method="fedit", client_ranks=[2, 4], lr=5e-2, weight_decay=0.1, lora_dropout=0.1)
    fed = engine.Federation(cfg)
    alone = engine.Federation(cfg.with_overrides(client_ranks=[]))  # lora_r=2: a PEFT model of rank 2
    assert fed.rank == 4 and fed.ranks == [2, 4, 2] and alone.rank == 2
    start = fed.client_start(0, 1)
    assert all(t.shape[0] == 2 for k, t in start.items() if ".lora_A." in k)
    data = fed.data.clients[0].train
    loss, trained = fed.train_client(start, data, 4, seed=3)
    loss_alone, trained_alone = alone.train_client(start, data, 4, seed=3)
    assert loss == pytest.approx(loss_alone, rel=1e-6)
    assert trained.keys() == trained_alone.keys()
    for k in trained:
        assert trained[k].shape == trained_alone[k].shape
        torch.testing.assert_close(trained[k], trained_alone[k], rtol=1e-5, atol=1e-6)
        assert not torch.equal(trained[k], start[k])  # it did train
    m = fed.modules[0]
    assert fed.model.get_submodule(m).scaling["default"] == pytest.approx(cfg.lora_alpha / 2)
    A, B = fed.slots.params[f"{m}.lora_A.weight"], fed.slots.params[f"{m}.lora_B.weight"]
    assert A.shape[0] == 4 and not A[2:].any() and not B[:, 2:].any()
    fed.slots.write(fed.global_tensors)  # the global adapter: all 4 slots, scaling α/4
    assert fed.model.get_submodule(m).scaling["default"] == pytest.approx(cfg.lora_alpha / 4)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_mixed_ranks_run_for_every_method(assets, tmp_path, method):
    """Clients of ranks 2, 4, 2: the global adapter has rank 4, each client uploads at its own rank and downloads
    its method's share at its own rank (the ledger books r_u, not the global rank), exact methods stay exact.
    rolora, lora_fair and fedsvd take equal ranks only: refused by name before the run starts."""
    if method not in BOUNDS and not METHODS[method].mixed_ranks:
        with pytest.raises(FloranaError, match=rf"client_ranks gives the clients different ranks \[2, 4\], which "
                                               f"method '{method}' does not accept"):
            tiny_config(assets, method=method, client_ranks=[2, 4], rounds=3, sample_fraction=0.67)
        return
    cfg = tiny_config(assets, method=method, client_ranks=[2, 4], rounds=3, sample_fraction=0.67)
    result = run(cfg, tmp_path / "run")
    fed = engine.Federation(cfg)
    head = sum(t.numel() * 4 for k, t in fed.initial.items() if ".lora_" not in k)
    factors = {"ffa": ("B",), "fedsa": ("A",)}.get(method, ("A", "B"))
    dims = [(fed.initial[f"{m}.lora_B.weight"].shape[0], fed.initial[f"{m}.lora_A.weight"].shape[1])
            for m in fed.modules]
    dk = sum(4 * d * k for d, k in dims)
    for i, m in enumerate(result.history):
        ranks = [fed.ranks[u] for u in m["clients"]]
        if method in BOUNDS:
            assert m["bytes_up"] == m["bytes_down"] == 0
            continue
        assert m["bytes_up"] == sum(lora_bytes(fed, r, factors) + head for r in ranks)
        down = {"flora": 0}.get(method, sum(lora_bytes(fed, r, factors) for r in ranks)) + head * len(ranks)
        if method == "flora" and i > 0:  # the last round's stack; a client that missed it gets the whole delta
            previous = result.history[i - 1]
            stack = sum(lora_bytes(fed, fed.ranks[v]) for v in previous["clients"])
            down += sum(stack if u in previous["clients"] or i == 1 else dk for u in m["clients"])
        if method == "fedex" and i > 0:  # the last round's residual, of rank ≤ Σ r_u + 4: as factors where they are
            previous = result.history[i - 1]  # smaller than d×k; a client that missed it gets the whole delta
            R = sum(fed.ranks[v] for v in previous["clients"]) + 4
            residual = sum(4 * min(d * k, R * (d + k)) for d, k in dims)
            down += sum(residual if u in previous["clients"] or i == 1 else dk for u in m["clients"])
        assert m["bytes_down"] == down, (i, m["clients"])
        if METHODS[method].exact:
            assert m["relative_error"] < 1e-5
    saved = load_adapter(tmp_path / "run" / "global_adapter")
    assert saved.config["r"] == 4 and all(mod.rank == 4 for mod in saved.modules.values())
    assert saved.scaling(fed.modules[0]) == pytest.approx(cfg.lora_alpha / 4)


@pytest.mark.parametrize("method", ["fedit", "hetlora", "florana", "svd", "flexlora", "fedex", "ffa", "fedsa"])
def test_what_a_client_of_a_smaller_rank_receives(assets, method):
    """Each client gets the first r_u components of the global factors (flexlora's: ΔW*'s top r_u, its own SVD
    slice), with B carried to its own scaling so that s_u·B_u·A_u = s·B̂[:, :r_u]Â[:r_u]; a client of the global
    rank gets the global factors themselves."""
    cfg = tiny_config(assets, method=method, client_ranks=[2, 4])
    fed = engine.Federation(cfg)
    fed.round(1)
    s, s_u = cfg.lora_alpha / 4, cfg.lora_alpha / 2
    for u in (0, 1):
        got = {k.split("::", 1)[1]: v for k, v in fed.downlink(u, {"bytes_down": 0, "round": 2}).items()
               if k.startswith("global::")}
        start = fed.client_start(u, 2, got)
        for m in fed.modules:
            a, b = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
            A, B = fed.global_tensors[a].double(), fed.global_tensors[b].double()
            assert (a in got) == METHODS[method].trains_A and (b in got) == (not METHODS[method].personal_B)
            if u == 1:
                assert all(torch.equal(got[k], fed.global_tensors[k]) for k in got)
                continue
            assert start[a].shape[0] == 2 and start[b].shape[1] == 2
            if a in got and b in got:
                torch.testing.assert_close(s_u * got[b].double() @ got[a].double(), s * B[:, :2] @ A[:2])
            elif b in got:  # ffa: the frozen shared A, rows 0..2
                torch.testing.assert_close(s_u * got[b].double(), s * B[:, :2])
                assert torch.equal(start[a], fed.initial[a][:2])
            else:  # fedsa: A's first rows; B stays the client's own
                assert torch.equal(got[a], fed.global_tensors[a][:2])
            if method == "flexlora":  # the global factors are ΔW*'s SVD: the first 2 are its best rank 2
                U, S, Vh = torch.linalg.svd(s * B @ A)
                torch.testing.assert_close(s * B[:, :2] @ A[:2], (U[:, :2] * S[:2]) @ Vh[:2], rtol=1e-4, atol=1e-6)


def test_a_dead_slot_is_revived_without_changing_the_product(assets):
    """fedit's global components 2..4 are zero after a round in which no rank-4 client took part; a client of rank
    4 then starts with fresh A rows there (B columns zero, so its start product is the global one) instead of two
    slots that would never get a gradient."""
    cfg = tiny_config(assets, method="fedit", client_ranks=[2, 2, 4])
    fed = engine.Federation(cfg)
    metrics = fed.open_round(1, [0, 1], [])
    results = {u: fed.local_update(u, fed.client_start(u, 1), 1)[0] for u in (0, 1)}
    fed.close_round(metrics, results, 0.0)
    m = fed.modules[0]
    a, b = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
    assert not fed.global_tensors[a][2:].any() and not fed.global_tensors[b][:, 2:].any()
    start = fed.client_start(2, 2)
    assert (start[a][2:] != 0).all() and not start[b][:, 2:].any()
    assert start[a][2:].abs().max() <= 1 / math.sqrt(start[a].shape[1])
    assert torch.equal(start[a][:2], fed.global_tensors[a][:2])
    assert torch.equal(fed.client_start(2, 2)[a], start[a])  # seeded by (seed, round, client)
    assert not torch.equal(fed.client_start(2, 3)[a], start[a])


@pytest.mark.parametrize("method", ["ffa", "flora", "fedex"])
def test_exact_methods_stay_exact_with_mixed_ranks(assets, method, monkeypatch):
    """The global model moves by exactly Σ_u w_u s_u B_u A_u of the clients' trained factors, each at its own rank
    and scaling α/r_u, computed densely here."""
    cfg = tiny_config(assets, method=method, client_ranks=[2, 4], weighting="examples")
    fed = engine.Federation(cfg)
    trained = {}
    real = engine.Federation.train_client

    def record(self, start, data, steps, seed, dp_client=None):
        loss, tensors = real(self, start, data, steps, seed, dp_client)
        trained[next(u for u, c in enumerate(self.data.clients) if c.train is data)] = tensors
        return loss, tensors

    monkeypatch.setattr(engine.Federation, "train_client", record)
    for r in (1, 2):
        before = {m: fed.slots.base_weight(m).double() + fed.slots.base_delta.get(m, 0) for m in fed.modules}
        trained.clear()
        fed.round(r)
        after = effective_weights(fed)
        sizes = {u: fed.data.clients[u].size for u in trained}
        for m in fed.modules:
            ideal = sum(sizes[u] / sum(sizes.values()) * cfg.lora_alpha / fed.ranks[u] *
                        (t[f"{m}.lora_B.weight"].double() @ t[f"{m}.lora_A.weight"].double())
                        for u, t in trained.items())
            assert ((after[m] - before[m] - ideal).norm() / ideal.norm()).item() < 1e-5, (m, r)
