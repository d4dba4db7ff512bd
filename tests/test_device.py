"""Devices and precision: resolving `device`, the precision policy, aggregation on a given device, and runs that
do not change on the CPU. GPU-only checks are skipped here unless CUDA is present (scripts/gpu_check.sh runs
them on a GPU machine)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from factories import make_clients
from florana.aggregation import METHODS, aggregate_adapters
from florana.aggregation.factors import ClientFactors
from florana.config import RunConfig, load_config
from florana.errors import FloranaError
from florana.federation.engine import Federation, read_metrics, resumed_config, run
from florana.train import device as device_module
from florana.train.device import Precision, on_cpu, peak_memory_mib, precision_for, resolve_device
from florana.train.local import train_steps
from tiny import sentiment_csv, tiny_bert

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs these "
                                                                "on a GPU machine)")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
SHARED_A = ("ffa", "rolora", "fedsvd")


# ---- resolving the device ---------------------------------------------------------------------------------
@NO_CUDA
def test_auto_and_cpu_resolve_to_the_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_a_clear_error(name):
    with pytest.raises(FloranaError, match=rf"device = '{name}', but this machine has no usable CUDA GPU.*auto"):
        resolve_device(name)


def test_cuda_index_out_of_range_is_an_error_naming_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(FloranaError, match=r"device = 'cuda:2', but this machine has 2 CUDA GPU\(s\) \(cuda:0 … cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:-1", "CPU", "mps", "cuda:0,1", ""])
def test_config_refuses_other_device_names(name):
    with pytest.raises(FloranaError, match="device must be auto, cpu, cuda or cuda:N"):
        RunConfig(device=name)
    with pytest.raises(FloranaError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_config_accepts_device_names_whatever_this_machine_has():
    """A config may be written on one machine and run on another: only the syntax is checked up front."""
    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:7"):
        assert RunConfig(device=name).device == name
    assert RunConfig().device == "auto"


# ---- the precision policy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_precision_policy_on_the_cpu_follows_native_bf16(monkeypatch, native, expected):
    """bfloat16 autocast only where the CPU computes it in hardware: emulated (an AVX2-only EPYC) it was 29×
    slower than float32, which made the default run take hours."""
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert precision_for(cpu, True) == Precision(cpu, expected)
    assert precision_for(cpu, True).name == ("bfloat16" if native else "float32")
    assert precision_for(cpu, False) == Precision(cpu, None)
    assert precision_for(cpu, True).scaler() is None


@pytest.mark.parametrize("bf16_supported, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_precision_policy_on_cuda_follows_bf16_support(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    gpu = torch.device("cuda", 0)
    p = precision_for(gpu, True)
    assert p.dtype == expected and p.scaled == (expected == torch.float16)
    assert precision_for(gpu, False) == Precision(gpu, None)  # bf16 = false: float32 everywhere


def test_autocast_follows_the_precision():
    x = torch.randn(4, 8)
    layer = torch.nn.Linear(8, 3)
    with Precision(torch.device("cpu"), torch.bfloat16).autocast():
        assert layer(x).dtype == torch.bfloat16
    with precision_for(torch.device("cpu"), False).autocast():
        assert layer(x).dtype == torch.float32
    with Precision(torch.device("cpu"), torch.float16).autocast():
        assert layer(x).dtype == torch.float16


def test_memory_helpers_are_silent_on_the_cpu():
    assert peak_memory_mib(torch.device("cpu")) is None
    t = {"a": torch.ones(2)}
    assert on_cpu(t)["a"] is t["a"]  # a no-op on the CPU: the CPU path's numbers cannot move


# ---- aggregation on a device ------------------------------------------------------------------------------
def _inputs(method, extra=True, ranks=None):
    return make_clients(kind="shared" if method in SHARED_A else "lora", seed=3, extra=extra, ranks=ranks)


def _same(a, b):
    assert a.report.to_json() == b.report.to_json()
    for key, t in a.adapter.state_dict().items():
        assert torch.equal(t, b.adapter.state_dict()[key]), key
    assert a.base_update.keys() == b.base_update.keys()
    for key, t in a.base_update.items():
        assert torch.equal(t, b.base_update[key]), key


@pytest.mark.parametrize("method", list(METHODS))
def test_explicit_cpu_device_equals_the_default(method):
    clients = _inputs(method)
    _same(aggregate_adapters(clients, method, weights=[1, 2, 3, 4]),
          aggregate_adapters(clients, method, weights=[1, 2, 3, 4], device="cpu"))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_tensor_made_inside_aggregation_follows_the_device(method):
    """With the default device set to 'meta', a tensor made without naming its device lands on 'meta' and cannot
    mix with the CPU factors: every method (mixed ranks, error feedback and a head included) must make its
    tensors on the device it computes on, as it must on a GPU."""
    mixed = METHODS[method].mixed_ranks
    clients = _inputs(method, ranks=[2, 3, 3, 2] if mixed else None)
    feedback = {} if METHODS[method].feeds_back else None
    expected = aggregate_adapters(clients, method, weights=[1, 2, 3, 4], feedback=feedback, device="cpu")
    again = None
    if feedback is not None:  # a second call carries a residual
        again = aggregate_adapters(clients, method, feedback=expected.feedback, round_=2, device="cpu")
    with torch.device("meta"):
        result = aggregate_adapters(clients, method, weights=[1, 2, 3, 4], feedback=feedback, device="cpu")
        if again is not None:
            second = aggregate_adapters(clients, method, feedback=result.feedback, round_=2, device="cpu")
    _same(result, expected)
    if again is not None:
        _same(second, again)
    assert all(t.device.type == "cpu" for t in result.adapter.state_dict().values())


def test_float32_small_matrices_stay_within_the_stated_bound():
    """Where a device has no float64 (MPS) the Grams and coefficients are float32 (linalg.real_dtype): the
    reported errors move by far less than the bound the docstring states (√(n·2⁻²⁴), n = 16 rows here)."""
    clients = _inputs("florana", extra=False)
    names = list(clients[0].modules)[:3]  # the 12×10 modules
    B = torch.stack([torch.cat([a.modules[n].B for a in clients], dim=1) for n in names])
    A = torch.stack([torch.cat([a.modules[n].A for a in clients], dim=0) for n in names])
    w = torch.full((4,), 0.25, dtype=torch.float64)
    exact = ClientFactors(B=B, A=A, ranks=(3,) * 4, scales=(2.0,) * 4, weights=w)
    single = dataclasses.replace(exact, weights=w.float(), real=torch.float32)
    bound = math.sqrt(16 * 2**-24)
    for name in ("fedit", "florana", "svd", "flexlora", "hetlora", "lora_fair"):
        e64, e32 = (METHODS[name].estimate(c, 2.0) for c in (exact, single))
        assert e32.coef_B.dtype == torch.float32
        err64 = (exact.error_sq(e64.coef_B, e64.coef_A, 2.0) / exact.target_norm_sq).sqrt()
        err32 = (exact.error_sq(e32.coef_B.double(), e32.coef_A.double(), 2.0) / exact.target_norm_sq).sqrt()
        assert (err32 - err64).abs().max().item() < bound, name
    assert (single.floor_sq(3).double().sqrt() - exact.floor_sq(3).sqrt()).abs().max() < \
        bound * exact.target_norm_sq.sqrt().max()


@CUDA
@pytest.mark.parametrize("method", list(METHODS))
def test_aggregation_on_cuda_matches_the_cpu(method):
    clients = _inputs(method)
    cpu = aggregate_adapters(clients, method, weights=[1, 2, 3, 4])
    gpu = aggregate_adapters(clients, method, weights=[1, 2, 3, 4], device="cuda")
    assert all(t.device.type == "cuda" for t in gpu.adapter.state_dict().values())
    assert gpu.report.relative_error == pytest.approx(cpu.report.relative_error, abs=1e-6)
    for key, t in cpu.adapter.state_dict().items():
        torch.testing.assert_close(gpu.adapter.state_dict()[key].cpu(), t, rtol=1e-4, atol=1e-5)


# ---- training and runs -------------------------------------------------------------------------------------
class _Linear(torch.nn.Module):
    """A model as train_steps sees one: model(**batch).loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(8, 1)

    def forward(self, x, y):
        return type("Out", (), {"loss": torch.nn.functional.mse_loss(self.layer(x).float(), y)})()


class _Recording(Precision):
    """A precision that keeps the GradScaler it hands out, to look at after training."""

    def scaler(self):
        object.__setattr__(self, "given", super().scaler())
        return self.given


def _batches(bad_step=None):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)

    def make(idx):
        xb = x[idx].clone()
        if bad_step is not None and idx[0] == bad_step:
            xb[0, 0] = float("inf")
        return {"x": xb, "y": y[idx]}
    return make, [np.arange(i * 8, i * 8 + 8) for i in range(4)]


def test_float16_trains_with_a_grad_scaler_and_still_rejects_a_non_finite_loss():
    model = _Linear()
    before = model.layer.weight.detach().clone()
    precision = _Recording(torch.device("cpu"), torch.float16)
    make, batches = _batches()
    loss = train_steps(model, list(model.parameters()), make, batches, lr=1e-2, weight_decay=0.0, precision=precision)
    assert math.isfinite(loss) and not torch.equal(model.layer.weight, before)
    assert precision.given is not None and precision.given._scale is not None  # it scaled the loss (lazily made)
    model = _Linear()
    make, batches = _batches(bad_step=16)  # the third batch holds an inf
    loss = train_steps(model, list(model.parameters()), make, batches, lr=1e-2, weight_decay=0.0,
                       precision=_Recording(torch.device("cpu"), torch.float16))
    assert math.isnan(loss)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    return dict(model=str(tiny_bert(root)), dataset=str(sentiment_csv(root)), num_clients=3, rounds=2,
                local_steps=2, batch_size=8, test_size=40, client_test_max=10, max_length=16, lora_r=2,
                lora_alpha=4.0, threads=1, lr=5e-3, alpha=1.0)


@NO_CUDA
@pytest.mark.parametrize("method, bf16", [("florana", True), ("fedex", False)])
def test_cpu_and_auto_give_identical_runs_on_this_machine(tiny, tmp_path, method, bf16):
    """The default path's numbers do not move: device = 'cpu' and 'auto' (the CPU here) give the same metrics and
    adapter, and metrics.jsonl has no GPU entry on the CPU."""
    a = run(RunConfig(**tiny, method=method, bf16=bf16, device="cpu"), tmp_path / "cpu")
    b = run(RunConfig(**tiny, method=method, bf16=bf16, device="auto"), tmp_path / "auto")
    strip = [[{k: v for k, v in m.items() if k != "seconds"} for m in r.history] for r in (a, b)]
    assert strip[0] == strip[1]
    assert all("gpu_peak_mib" not in m for m in read_metrics(tmp_path / "auto"))
    for name in ("adapter_model.safetensors", "base_update.safetensors"):
        x, y = tmp_path / "cpu" / "global_adapter" / name, tmp_path / "auto" / "global_adapter" / name
        assert x.is_file() == y.is_file()
        if x.is_file():
            tx, ty = load_file(x), load_file(y)
            assert all(torch.equal(tx[k], ty[k]) for k in tx)


def test_a_run_keeps_its_server_state_on_the_cpu(tiny):
    fed = Federation(RunConfig(**tiny, method="fedsa", device="cpu"))
    fed.round(1)
    assert fed.device == torch.device("cpu") and fed.precision == precision_for(fed.device, True)
    for tensors in (fed.initial, fed.global_tensors, *fed.personal.values(), fed.state_tensors()):
        assert all(t.device.type == "cpu" for t in tensors.values())


def test_a_resumed_run_may_move_to_another_device_but_keeps_the_rest(tiny, tmp_path):
    run(RunConfig(**tiny, device="auto"), tmp_path / "r")
    moved = resumed_config(tmp_path / "r", RunConfig(**tiny, device="cpu"))
    assert moved.device == "cpu" and load_config(tmp_path / "r" / "config.toml").device == "cpu"
    with pytest.raises(FloranaError, match="lr 0.005 → 0.01 differ"):
        resumed_config(tmp_path / "r", RunConfig(**{**tiny, "lr": 0.01}, device="auto"))


@CUDA
def test_a_cuda_run_books_its_gpu_peak_and_keeps_the_server_state_on_the_cpu(tiny, tmp_path):
    result = run(RunConfig(**tiny, method="fedex", device="cuda"), tmp_path / "gpu")
    assert all(m["gpu_peak_mib"] > 0 for m in result.history)
    assert all(math.isfinite(m["global_accuracy"]) for m in result.history)
    fed = Federation(RunConfig(**tiny, method="fedex", device="cuda"))
    fed.round(1)
    assert next(fed.model.parameters()).device.type == "cuda"
    assert all(t.device.type == "cuda" for t in fed.slots.base_delta.values())
    assert all(t.device.type == "cpu" for t in fed.state_tensors().values())


@pytest.mark.parametrize("kind", ["csv", "jsonl", "json"])
def test_local_files_load_the_same_without_the_datasets_package(tmp_path, monkeypatch, kind):
    """A bare GPU machine has torch, transformers and peft but not datasets: local csv and json files load there
    with Python's own readers, into the same examples."""
    import json as json_module

    from florana.data.sources import load_examples
    from tiny import arithmetic_jsonl

    if kind == "csv":
        path, causal = sentiment_csv(tmp_path), False
    else:
        path, causal = arithmetic_jsonl(tmp_path), True
        if kind == "json":  # one JSON array rather than JSON lines
            rows = [json_module.loads(line) for line in path.read_text().splitlines()]
            path = tmp_path / "sums.json"
            path.write_text(json_module.dumps(rows))
    columns = {"text_column": "question", "label_column": "answer"} if causal else {}
    with_datasets = load_examples(str(path), causal=causal, **columns)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # `import datasets` now fails
    without = load_examples(str(path), causal=causal, **columns)
    assert without.texts == with_datasets.texts and without.label_names == with_datasets.label_names
    assert np.array_equal(without.labels, with_datasets.labels) and without.answers == with_datasets.answers
    with pytest.raises(FloranaError, match="hub datasets need the datasets package, which is not installed"):
        load_examples("openai/gsm8k:main")
