"""FloranaLoRA, the drop-in Flower strategy: replies built from PEFT state dicts, checked node by node, aggregated
by the same code path as `florana aggregate`; and the FlowerTune-style example app in a Flower simulation."""

import json
import math
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import florana
from florana.cli import app as cli
from florana.errors import FloranaError
from florana.flower.deploy import pids_with_env
from florana.flower.strategies import FloranaLoRA

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flowertune_llm"
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def tiny_llama_state(seed: int, **lora) -> dict:
    """A client's PEFT state dict on a tiny Llama (the same base for all), factors of its own seed."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(**{**LORA.to_dict(), **lora, "init_lora_weights": False}))
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def reply(node: int, state: dict, metrics: dict) -> Message:
    """A node's train reply as the ServerApp receives it."""
    content = RecordDict({"arrays": ArrayRecord(state),
                          "metrics": MetricRecord(metrics)})
    return Message(content, metadata=Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0,
                                              reply_to_message_id="m", group_id="", created_at=0.0, ttl=60.0,
                                              message_type=MessageType.TRAIN))


@pytest.fixture(scope="module")
def states():
    return [tiny_llama_state(10 + u) for u in range(3)]


@pytest.mark.parametrize("method", ["fedit", "florana", "svd"])
def test_a_round_equals_florana_aggregate_weighted_by_num_examples(states, method):
    strategy = FloranaLoRA(method, lora_config=LORA)
    counts = [10, 30, 20]
    arrays, metrics = strategy.aggregate_train(1, [reply(100 + u, s, {"train_loss": float(u), "num-examples": n})
                                                   for u, (s, n) in enumerate(zip(states, counts))])
    expected, report = florana.aggregate(states, method, lora_config=LORA, weights=counts)
    got = arrays.to_torch_state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert metrics["aggregation-error"] == report.relative_error > 0
    assert metrics["aggregation-error-floor"] == report.error_floor
    assert metrics["aggregation-bytes-up"] == sum(report.bytes_up_per_client) > 0
    assert metrics["flower-bytes-up"] == sum(t.numel() * 4 for s in states for t in s.values())
    assert metrics["train_loss"] == pytest.approx((0 * 10 + 1 * 30 + 2 * 20) / 60)  # FedAvg's weighted mean
    assert strategy.reports[1].weights == pytest.approx([c / 60 for c in counts])


def test_uniform_weights_need_no_num_examples(states):
    strategy = FloranaLoRA("svd", lora_config=LORA, uniform_weights=True)
    arrays, metrics = strategy.aggregate_train(1, [reply(7 + u, s, {"train_loss": float(u)})
                                                   for u, s in enumerate(states)])
    expected, _ = florana.aggregate(states, "svd", lora_config=LORA)
    assert all(torch.equal(arrays.to_torch_state_dict()[k], v) for k, v in expected.items())
    assert metrics["train_loss"] == pytest.approx(1.0)


def bad(states, node_state):
    return [reply(100, states[0], {"num-examples": 1}), reply(101, node_state, {"num-examples": 1})]


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop(f"{Q}.lora_B.weight"), f"node 101: module {Q}: has {Q}.lora_A.weight but no {Q}.lora_B.weight"),
    (lambda s: s.__setitem__(f"{Q}.lora_B.weight", torch.zeros(16, 3)), f"node 101: module {Q}: factors of shapes"),
    (lambda s: s.__setitem__(f"{Q}.lora_A.weight", torch.zeros(4, 8)), f"node 101: module {Q}: shape"),
    (lambda s: s[f"{Q}.lora_A.weight"].__setitem__((0, 0), math.nan), f"node 101: module {Q}: lora_A holds NaN"),
    (lambda s: s[f"{Q}.lora_B.weight"].__setitem__((1, 1), math.inf), f"node 101: module {Q}: lora_B holds NaN or Inf"),
    (lambda s: (s.pop(f"{Q}.lora_A.weight"), s.pop(f"{Q}.lora_B.weight")), f"node 101: lacks module {Q}"),
    (lambda s: s.__setitem__("base_model.model.lm_head.weight", torch.zeros(40, 16)),
     "node 101: has tensor base_model.model.lm_head.weight that node 100 lacks"),
])
def test_a_bad_reply_names_the_node_and_the_module(states, mutate, message):
    state = {k: v.clone() for k, v in states[1].items()}
    mutate(state)
    with pytest.raises(FloranaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FloranaLoRA("florana", lora_config=LORA).aggregate_train(1, bad(states, state))


@pytest.mark.parametrize("count", [-1, math.nan, [1, 2], None])
def test_a_bad_weight_names_the_node(states, count):
    metrics = {} if count is None else {"num-examples": count}
    replies = [reply(100, states[0], {"num-examples": 3}), reply(101, states[1], metrics)]
    with pytest.raises(FloranaError, match="node 101: its MetricRecord's 'num-examples' is"):
        FloranaLoRA("fedit", lora_config=LORA).aggregate_train(1, replies)


def test_methods_that_change_the_base_are_refused_saying_what_the_client_would_do():
    for method, what in (("flora", "merge the stacked update"), ("fedex", "add the dense residual")):
        with pytest.raises(FloranaError, match=f"{method} is not available as a drop-in strategy: each client would "
                                               f"have to {what}"):
            FloranaLoRA(method, lora_config=LORA)
    with pytest.raises(FloranaError, match="needs lora_config"):
        FloranaLoRA("svd")
    with pytest.raises(FloranaError, match="unknown method 'fedavg'"):
        FloranaLoRA("fedavg", lora_config=LORA)


def test_ffa_names_the_node_whose_a_is_not_the_shared_frozen_one(states):
    """ffa clients must keep A frozen at the shared init: a node that trained A is named."""
    frozen = [{k: (states[0][k] if ".lora_A." in k else v) for k, v in s.items()} for s in states]
    arrays, _ = FloranaLoRA("ffa", lora_config=LORA).aggregate_train(1, [reply(100 + u, s, {"num-examples": 1})
                                                                       for u, s in enumerate(frozen)])
    assert torch.equal(arrays.to_torch_state_dict()[f"{Q}.lora_A.weight"], states[0][f"{Q}.lora_A.weight"])
    with pytest.raises(FloranaError, match=f"node 101: module {Q}: lora_A differs from node 100's; ffa needs every "
                                           "client to keep the shared frozen A"):
        FloranaLoRA("ffa", lora_config=LORA).aggregate_train(1, bad(frozen, states[1]))


# ---- the example app in a Flower simulation -------------------------------------------------------------
def test_the_example_declares_the_defaults_its_code_uses():
    sys.path.insert(0, str(EXAMPLE))
    try:
        from flowertune_llm.task import DEFAULTS
    finally:
        sys.path.remove(str(EXAMPLE))
    declared = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}

    assert flat(declared) == DEFAULTS


def save_adapter_folder(state: dict, config: dict, folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors")
    return folder


def products(state: dict, scaling: float) -> dict:
    return {k[: -len(".lora_A.weight")]: scaling * state[k.replace("lora_A", "lora_B")] @ state[k]
            for k in state if k.endswith(".lora_A.weight")}


@pytest.mark.parametrize("method", ["fedit", "florana", "svd"])
def test_the_flowertune_example_in_a_simulation_equals_florana_aggregate(tmp_path, monkeypatch, method):
    """The example (a ClientApp that knows only Flower and PEFT), 2 nodes, 2 rounds, in Flower's simulation engine:
    the last round's global LoRA product equals what `florana aggregate` computes on the adapters the nodes sent."""
    from flwr.app import Context
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    monkeypatch.syspath_prepend(str(EXAMPLE))
    paths = [str(EXAMPLE), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))  # for the Ray workers that run the ClientApp
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flowertune_llm import server_app
    from flowertune_llm.client_app import app as client_app
    from flowertune_llm.task import DEFAULTS, lora_config

    seen = {}
    aggregate_train = FloranaLoRA.aggregate_train

    def recording(self, server_round, replies):
        replies = list(replies)
        seen[server_round] = ([(m.content["arrays"].to_torch_state_dict(), m.content["metrics"]["num-examples"])
                               for m in replies], *aggregate_train(self, server_round, replies))
        return seen[server_round][1:]

    monkeypatch.setattr(FloranaLoRA, "aggregate_train", recording)
    run_config = {**DEFAULTS, "strategy.method": method, "save-path": str(tmp_path / "global")}
    app = ServerApp()

    @app.main()
    def main(grid, context):  # the example's ServerApp with the run config `flwr run` would hand it
        server_app.main(grid, Context(run_id=context.run_id, node_id=0, node_config={}, state=context.state,
                                      run_config=run_config))

    run_simulation(app, client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0, "logging_level": "ERROR",
                                                 "include_dashboard": False}})
    assert sorted(seen) == [1, 2]
    clients, arrays, metrics = seen[2]
    assert len(clients) == 2 and metrics["aggregation-error"] >= metrics["aggregation-error-floor"] - 1e-12
    config = json.loads(json.dumps(lora_config(DEFAULTS).to_dict(), default=lambda x: sorted(x)
                                   if isinstance(x, set) else getattr(x, "value", str(x))))
    folders = [save_adapter_folder(s, config, tmp_path / f"node{u}") for u, (s, _) in enumerate(clients)]
    done = CliRunner().invoke(cli, ["aggregate", *map(str, folders), "--method", method, "--out", str(tmp_path / "cli"),
                                    "--weights", ",".join(str(n) for _, n in clients)])
    assert done.exit_code == 0, done.output
    scaling = DEFAULTS["model.lora.peft-lora-alpha"] / DEFAULTS["model.lora.peft-lora-r"]
    want = products(load_file(tmp_path / "cli" / "adapter_model.safetensors"), scaling)
    got = products(arrays.to_torch_state_dict(), scaling)
    saved = products(load_file(tmp_path / "global" / "adapter_model.safetensors"), scaling)  # what the app saved
    assert want.keys() == got.keys() == saved.keys() and len(want) == 4
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(saved[k], want[k], rtol=1e-6, atol=1e-8)
    assert any(float(v.abs().max()) > 0 for v in want.values())  # clients trained: the product is not B=0's
    deadline = __import__("time").monotonic() + 20
    while (left := pids_with_env("RAY_TMPDIR", os.environ["RAY_TMPDIR"])) and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.5)
    assert not left, f"processes left running: {left}"


class NodesGrid:
    """The one Grid method FedAvg's configure_train asks: the connected node ids."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def test_a_node_of_a_smaller_rank_gets_the_global_adapter_at_its_rank(states, monkeypatch):
    """hetlora with nodes of ranks 4 and 2: after their replies, node 101 receives the first 2 components, its B
    rescaled from the global lora_alpha/4 to its lora_alpha/2, so that its product is the global one's there."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    for identity in ("_run_id", "_task_id", "_node_id"):  # the ServerApp's identity, which Flower sets
        monkeypatch.setattr(TaskIdentity, identity, 1)
    small = tiny_llama_state(20, r=2)
    strategy = FloranaLoRA("hetlora", lora_config=LORA)
    arrays, _ = strategy.aggregate_train(1, [reply(100, states[0], {"num-examples": 1}),
                                             reply(101, small, {"num-examples": 1})])
    assert strategy.node_ranks == {100: 4, 101: 2}
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, arrays, ConfigRecord(),
                                                                              NodesGrid([100, 101]))}
    full, cut = (messages[n].content["arrays"].to_torch_state_dict() for n in (100, 101))
    assert full.keys() == cut.keys() and all(torch.equal(full[k], v) for k, v in
                                             arrays.to_torch_state_dict().items())
    A, B = f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"
    assert cut[A].shape == (2, 16) and cut[B].shape == (16, 2)
    torch.testing.assert_close((8 / 2) * cut[B] @ cut[A], (8 / 4) * full[B][:, :2] @ full[A][:2])
    assert messages[101].content["config"]["server-round"] == 2
    evaluated = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(2, arrays, ConfigRecord(),
                                                                                 NodesGrid([100, 101]))}
    assert evaluated[101].metadata.message_type == MessageType.EVALUATE
    assert all(torch.equal(v, cut[k]) for k, v in evaluated[101].content["arrays"].to_torch_state_dict().items())


def test_flwr_run_dot_runs_the_example_as_a_flower_app(tmp_path):
    """`flwr run . --stream` in a copy of the example, with its pyproject's defaults (2 nodes, 2 rounds, florana):
    the run completes, prints each round's aggregation metrics, and saves a global adapter PEFT loads."""
    import shutil
    import subprocess

    from peft import PeftModel, get_peft_model_state_dict

    from florana.flower.deploy import flower_env, free_port

    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "flwr-home"
    env = {**flower_env(home), "PYTHONPATH": str(ROOT / "src"),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    try:
        done = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", ".", "--stream", "--run-config",
                               f'save-path="{tmp_path / "global"}"'], cwd=app, env=env, capture_output=True,
                              text=True, timeout=400)
        out = done.stdout + done.stderr
        assert done.returncode == 0 and "(2 simulated SuperNodes)" in out, out[-3000:]
        rounds = re.findall(r"Aggregated MetricRecord: \{[^}]*'aggregation-error': ([0-9.e-]+)", out)
        assert len(rounds) == 2 and all(0 < float(e) < 1 for e in rounds) and "Traceback" not in out, out[-3000:]
    finally:  # `flwr run` leaves the local SuperLink running, detached: stop it and its helpers by pid
        for pid in pids_with_env("FLWR_HOME", str(home)):
            os.kill(pid, 9)
    sys.path.insert(0, str(app))
    try:
        from flowertune_llm.task import DEFAULTS, get_model
    finally:
        sys.path.remove(str(app))
    # onto the plain base model (get_model wraps it in a fresh adapter, which unload() takes off again)
    model = PeftModel.from_pretrained(get_model(DEFAULTS).unload(), tmp_path / "global")
    saved, loaded = load_file(tmp_path / "global" / "adapter_model.safetensors"), get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any(float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    deadline = __import__("time").monotonic() + 20
    while (left := pids_with_env("FLWR_HOME", str(home))) and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.5)
    assert not left, f"processes left running: {left}"
