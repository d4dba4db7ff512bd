"""The Flower runtime with real processes on loopback: Ray simulation, `flwr run .`, a SuperLink with SuperNodes
(plain, and TLS with SuperNode authentication), and SuperNodes killed mid-round. Each Flower run is checked
against the in-process engine on the same config: the global adapter and every metric must be identical."""

import copy
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w
import torch
from flwr.app import Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from florana.aggregation import METHODS
from florana.config import FIELDS, RunConfig, default_of
from florana.errors import FloranaError
from florana.federation.engine import Federation, read_metrics, run
from florana.flower.deploy import Loopback, flower_env, free_port, pids_with_env, stage_app
from florana.flower.server import REPLY_POLL, FloranaStrategy, PromptGrid, nodes_num_partitions
from florana.flower.wire import (CLIENTS_FROM_NODES, RUNTIME_KEYS, flower_run_config, from_record, split_run_config,
                                 to_record)
from tiny import sentiment_csv, tiny_bert

ROOT = Path(__file__).resolve().parent.parent
FLOWER_ONLY = {"flower_bytes_up", "flower_bytes_down", "seconds"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower")
    return dict(model=str(tiny_bert(root)), dataset=str(sentiment_csv(root)), num_clients=2, rounds=2,
                local_steps=2, batch_size=8, test_size=40, client_test_max=10, max_length=16, lora_r=2,
                lora_alpha=4.0, threads=1, bf16=False, lr=5e-3, alpha=1.0)


def strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in FLOWER_ONLY} for m in history]


def assert_same_outputs(flower_dir: Path, inproc_dir: Path) -> None:
    """Same global adapter (and base update) bit for bit, same metrics but for timing and Flower's byte count."""
    for name in ("adapter_model.safetensors", "base_update.safetensors"):
        a, b = inproc_dir / "global_adapter" / name, flower_dir / "global_adapter" / name
        assert a.is_file() == b.is_file(), name
        if a.is_file():
            ta, tb = load_file(a), load_file(b)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert strip(read_metrics(flower_dir)) == strip(read_metrics(inproc_dir))


def assert_same_run(flower_dir: Path, inproc_dir: Path) -> None:
    """assert_same_outputs, for a run whose every round went through Flower: and what Flower moved is what the
    ledger books (array bytes, both ways, every round)."""
    assert_same_outputs(flower_dir, inproc_dir)
    for m in read_metrics(flower_dir):
        assert m["flower_bytes_up"] == m["bytes_up"] > 0 and m["flower_bytes_down"] == m["bytes_down"] > 0, m


def assert_no_leftovers(var: str, value: str) -> None:
    """No live process still carries var=value in its environment (all we started is stopped)."""
    deadline = time.monotonic() + 20
    while (left := pids_with_env(var, value)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left running: {left}"


# ---- pure pieces ------------------------------------------------------------------------------------
def fab_files(app: Path) -> dict[str, bytes]:
    """The files of the FAB `flwr run` builds from `app`, but its manifest."""
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        return {i.filename: fab.read(i) for i in fab.infolist() if not i.filename.startswith(".info/")}


def test_a_loopback_run_builds_its_fab_from_a_copy_of_what_the_fab_carries(tmp_path):
    """`flwr run` walks every file under the app folder before it filters them (a checkout's .venv: ~57,000 files,
    8–11 s a run): stage_app copies what the FAB carries, and the FAB built from the copy is the same."""
    app = tmp_path / "app"
    files = {"src/pkg/__init__.py": "", "src/pkg/sub/b.py": "x = 1\n", "src/pkg/data.bin": "\0",
             "configs/a.toml": "k = 1\n", "README.md": "# app\n", ".venv/lib/site.py": "", "tests/test_a.py": "",
             "runs/r/metrics.jsonl": "{}\n"}
    for name, text in files.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (app / "pyproject.toml").write_text(tomli_w.dumps(project).replace('"src/florana/**/*.py"', '"src/pkg/**/*.py"'))
    staged = stage_app(app, tmp_path / "staged")
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == \
        ["README.md", "configs/a.toml", "pyproject.toml", "src/pkg/__init__.py", "src/pkg/sub/b.py"]
    assert fab_files(staged) == fab_files(app)
    assert stage_app(app, tmp_path / "staged") == tmp_path / "staged"  # staged again over the last copy
    del project["tool"]["flwr"]["app"]["fab-include"]  # without the patterns, the app is built from where it is
    (app / "pyproject.toml").write_text(tomli_w.dumps(project))
    assert stage_app(app, tmp_path / "other") == app.resolve() and not (tmp_path / "other").exists()


def test_the_server_takes_replies_as_they_arrive_not_every_3_s(monkeypatch):
    """Flower's deployment grid sleeps 3 s between pulls of a wave's replies; the server's pulls every REPLY_POLL s,
    keeps what each pull brings, and stops at the timeout with the replies it has."""
    class Pulls:  # message i's reply arrives at pull i + 1
        def __init__(self):
            self.pulls = 0

        def push_messages(self, messages):
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.pulls += 1
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                    if int(i[1:]) < self.pulls]

        def get_node_ids(self):
            return [7]

    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    grid = PromptGrid(Pulls())
    replies = grid.send_and_receive([None] * 3, timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 3 and sleeps == [REPLY_POLL] * 2 and grid.get_node_ids() == [7]
    clock = iter(range(0, 1000, 10))  # each look at the clock 10 s on: past the 15 s timeout after pull 2
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    sleeps.clear()
    assert len(PromptGrid(Pulls()).send_and_receive([None] * 3, timeout=15)) == 2 and sleeps == [REPLY_POLL]


def test_records_round_trip_and_refuse_bad_payloads():
    tensors = {"a.lora_A.weight": torch.randn(2, 4), "a.lora_B.weight": torch.randn(4, 2).bfloat16()}
    back = from_record(to_record(tensors), tensors, "node 7")
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)
    with pytest.raises(FloranaError, match="node 7: payload keys"):
        from_record(to_record({"a.lora_A.weight": tensors["a.lora_A.weight"]}), tensors, "node 7")
    with pytest.raises(FloranaError, match=r"node 7: array a.lora_A.weight has shape \(3, 4\)"):
        from_record(to_record({**tensors, "a.lora_A.weight": torch.zeros(3, 4)}), tensors, "node 7")


def test_a_message_flower_cannot_carry_is_refused_before_it_is_sent():
    """Flower sends arrays in chunks and every other record whole, each under its limit per request: the check
    passes what chunking carries, and refuses (naming the limit, the size and the record) what it cannot."""
    from flwr.app import ConfigRecord

    from florana.flower.wire import FLOWER_OBJECT_LIMIT, check_sendable

    assert FLOWER_OBJECT_LIMIT == 2**31 - 1
    content = RecordDict({"global": to_record({"a.lora_A.weight": torch.zeros(64, 64)}),  # 16 KiB + header
                          "config": ConfigRecord({"toml": "x" * 1000, "round": 3})})
    check_sendable(content, "node 5", limit=8192, chunk=4096)  # the array goes in 4 KiB chunks: fine
    with pytest.raises(FloranaError, match=r"node 5: array global/a.lora_A.weight \(16,\d+ bytes\) would travel in "
                                           r"pieces of 16,\d+ bytes .* over Flower's limit of 8,192 bytes"):
        check_sendable(content, "node 5", limit=8192, chunk=1 << 20)
    with pytest.raises(FloranaError, match=r"node 5: record config holds 1,008 bytes in one piece, over Flower's "
                                           r"limit of 1,000 bytes per request \(GRPC_MAX_MESSAGE_LENGTH\)"):
        check_sendable(content, "node 5", limit=1000, chunk=512)


def test_run_config_keys():
    config, runtime = split_run_config({"method": "fedit", "target_modules": "query, key", "min-nodes": 3})
    assert config == RunConfig(method="fedit", target_modules=["query", "key"]) and runtime["min-nodes"] == 3
    with pytest.raises(FloranaError, match="unknown key 'lr_max'"):
        split_run_config({"lr_max": 1.0})
    assert split_run_config({"num_clients": 0}, num_partitions=3)[0].num_clients == 3
    assert split_run_config({"num_clients": 4}, num_partitions=3)[0].num_clients == 4
    with pytest.raises(FloranaError, match="num_clients=0 .* needs the nodes' num-partitions"):
        split_run_config({"num_clients": 0})
    # client_ranks travels as '4,8,16' (Flower's values are scalars), '' for none
    assert split_run_config({"client_ranks": "4, 8,16"})[0].client_ranks == [4, 8, 16]
    assert split_run_config({"client_ranks": ""})[0].client_ranks == []
    assert split_run_config({"client_ranks": 4})[0].client_ranks == [4]
    assert flower_run_config(RunConfig(client_ranks=[4, 8]))["client_ranks"] == "4,8"
    with pytest.raises(FloranaError, match="client_ranks should be comma-separated integers, got '4,x'"):
        split_run_config({"client_ranks": "4,x"})
    # before the nodes say how many partitions there are, num_clients=0 fits any client_ranks
    from florana.flower.server import ANY_CLIENTS

    assert split_run_config({"num_clients": 0, "client_ranks": "2,4"}, ANY_CLIENTS)[0].client_ranks == [2, 4]


def test_pyproject_declares_every_config_key_with_its_default():
    """The Flower app's defaults are florana's, but for num_clients: 0 there, one client per node partition."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == {**flower_run_config(RunConfig()), "num_clients": CLIENTS_FROM_NODES, **RUNTIME_KEYS}
    assert set(FIELDS) <= set(declared) and default_of("target_modules") == ["query", "value"]


# ---- the message path, in this process ------------------------------------------------------------------
class LocalGrid:
    """Flower's Grid in this process: every message goes to florana's ClientApp with its node's own Context, whose
    state persists across rounds as a SuperNode keeps it. The strategy, the payloads and the ClientApp are the real
    ones; only the transport is a function call."""

    def __init__(self, num_nodes: int, run_id: int = 1):
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self.contexts = {100 + i: Context(run_id=run_id, node_id=100 + i, node_config={"partition-id": i,
                                                                                  "num-partitions": num_nodes},
                                          state=RecordDict(), run_config={}) for i in range(num_nodes)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        from florana.flower.client import app as client_app

        replies = []
        for msg in messages:
            try:
                # a copy, as a transport delivers one: Flower's secaggplus_mod edits the message it gets
                replies.append(client_app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id]))
            except Exception as e:  # as a SuperNode reports a failed ClientApp
                replies.append(Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg))
        return replies


class FreshProcessGrid(LocalGrid):
    """LocalGrid, but every message finds an empty model cache, as in a deployment, where Flower 1.42 starts a fresh
    flwr-clientapp process for each message."""

    def send_and_receive(self, messages, timeout=None):
        from florana.flower import client

        replies = []
        for msg in messages:
            client._worker.clear()
            replies += super().send_and_receive([msg], timeout)
        return replies


@pytest.mark.parametrize("method", ["flora", "fedsa"])
def test_a_node_process_loads_the_model_once_per_run_and_nothing_leaks(tiny, tmp_path, method):
    """One process serving every node and round of a run (a Ray actor) loads the model and data once; a run with
    another id loads them again and evicts the first. The cached model carries nothing from one message to the
    next: the run equals, bit for bit, one whose every message loaded afresh (flora changes the base each round,
    fedsa keeps a personal B per node: neither may leak into another node's or round's training)."""
    from florana.flower import client
    from florana.flower.server import serve

    cfg = RunConfig(**{**tiny, "num_clients": 3, "rounds": 3, "sample_fraction": 0.67}, method=method)
    client._worker.clear()
    client.LOADS.clear()
    serve(LocalGrid(3), cfg, tmp_path / "warm", node_wait=5)
    assert len(client.LOADS) == 1  # 3 nodes, 3 rounds, 6 training messages: one load
    serve(FreshProcessGrid(3), cfg, tmp_path / "cold", node_wait=5)
    assert len(client.LOADS) == 1 + 6
    assert_same_outputs(tmp_path / "warm", tmp_path / "cold")
    client._worker.clear()
    client.LOADS.clear()
    serve(LocalGrid(3), cfg, tmp_path / "run1", node_wait=5)
    serve(LocalGrid(3, run_id=2), cfg, tmp_path / "run2", node_wait=5)
    assert [key[0] for key in client.LOADS] == [1, 2] and [key[0] for key in client._worker] == [2]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_flower_moves_what_the_ledger_books(tiny, tmp_path, method):
    """Every method's payloads through the real strategy and ClientApp: only what its protocol sends crosses
    (fedsa: A; ffa: B; flora: its stacked factors as a base change; fedex: factors and residual), clients that
    missed rounds catch up on the base, Flower's byte count equals the ledger's, and the run equals the
    in-process one."""
    from florana.flower.server import serve

    cfg = RunConfig(**{**tiny, "num_clients": 3, "rounds": 3, "sample_fraction": 0.67}, method=method)
    serve(LocalGrid(3), cfg, tmp_path / "flower", node_wait=5)
    run(cfg, tmp_path / "inproc")
    assert_same_run(tmp_path / "flower", tmp_path / "inproc")


def test_method_options_and_diagnostics_through_flowers_run_config(tiny, tmp_path):
    """A method option travels in Flower's flat run config to the server's aggregator (florana's balanced gauge:
    ‖Â‖_F = ‖B̂‖_F), and the per-round diagnostics reach metrics.jsonl as in the in-process run."""
    from florana.flower.server import serve

    flat = flower_run_config(RunConfig(**tiny, method="florana", florana_gauge="balanced"))
    cfg, _ = split_run_config(flat)
    assert cfg.florana_gauge == "balanced"
    serve(LocalGrid(2), cfg, tmp_path / "flower", node_wait=5)
    run(cfg, tmp_path / "inproc")
    assert_same_run(tmp_path / "flower", tmp_path / "inproc")
    for m in read_metrics(tmp_path / "flower"):
        assert m["norm_A"] == pytest.approx(m["norm_B"], rel=1e-5)  # FedIT's differ by a few %: balanced moved it
        assert abs(m["fedit_norm_A"] - m["fedit_norm_B"]) > 1e-2 * m["fedit_norm_A"]
        assert m["florana_sweeps_max"] >= 1 and m["florana_p_min"] <= m["florana_p_max"]


def test_backend_config_gives_each_client_its_share_of_a_gpu():
    """--gpus-per-client becomes Ray's num_gpus per client (and Ray is told the machine's GPUs); asking for a GPU
    that is not there, or a CUDA device for clients that get none, is an error before Ray starts."""
    from florana.flower.simulation import backend_config

    cfg = RunConfig(threads=2)
    backend = backend_config(cfg, cpus=16, gpus_per_client=0.25, gpus=2)
    assert backend["client_resources"] == {"num_cpus": 2, "num_gpus": 0.25}
    assert backend["init_args"]["num_gpus"] == 2 and backend["init_args"]["num_cpus"] == 16
    assert backend_config(cfg, cpus=1, gpus_per_client=0.0, gpus=0)["client_resources"] == {"num_cpus": 1,
                                                                                            "num_gpus": 0.0}
    with pytest.raises(FloranaError, match="--gpus-per-client 0.25: this machine has no CUDA GPU"):
        backend_config(cfg, cpus=16, gpus_per_client=0.25, gpus=0)
    with pytest.raises(FloranaError, match="a share of one GPU"):
        backend_config(cfg, cpus=16, gpus_per_client=1.5, gpus=2)
    with pytest.raises(FloranaError, match="device = 'cuda', but clients get no GPU: give them a share with "
                                           "--gpus-per-client"):
        backend_config(RunConfig(device="cuda"), cpus=16, gpus_per_client=0.0, gpus=2)


def test_gpus_per_client_is_a_flower_option():
    from typer.testing import CliRunner

    from florana.cli import app

    res = CliRunner().invoke(app, ["run", "--gpus-per-client", "0.25", "--rounds", "1"])
    assert res.exit_code == 2 and "--gpus-per-client is for --runtime flower" in res.output


def test_a_node_trains_on_the_device_its_node_config_names(tiny, tmp_path, caplog):
    """A node's `device` in its node config overrides the run's: one node says cpu and trains there (the run is
    the in-process one, bit for bit); a bad device fails that node's round, naming the node, not the run."""
    from florana.flower import client
    from florana.flower.server import serve

    cfg = RunConfig(**tiny, device="auto")
    grid = LocalGrid(2)
    for ctx in grid.contexts.values():
        ctx.node_config["device"] = "cpu"
    serve(grid, cfg, tmp_path / "flower", node_wait=5)
    (fed,) = client._worker.values()
    assert fed.config.device == "cpu" and fed.device == torch.device("cpu")
    run(cfg, tmp_path / "inproc")
    assert_same_run(tmp_path / "flower", tmp_path / "inproc")

    grid = LocalGrid(2)
    grid.contexts[101].node_config["device"] = "gpu"
    with caplog.at_level(logging.WARNING):
        serve(grid, RunConfig(**{**tiny, "rounds": 1}), tmp_path / "bad", node_wait=5)
    assert read_metrics(tmp_path / "bad")[0]["missing"] == [1]
    assert "node 101: its node config's device must be auto, cpu, cuda or cuda:N, got 'gpu'" in caplog.text


@pytest.mark.parametrize("method, ranks", [("fedit", []), ("hetlora", [2, 4])])
def test_error_feedback_lives_on_the_server(tiny, tmp_path, method, ranks):
    """The residual error feedback carries is server state: nothing more crosses the wire, and a Flower run equals
    the in-process one (also with clients of different ranks, each downloading at its own)."""
    from florana.flower.server import serve

    cfg = RunConfig(**{**tiny, "rounds": 3, "client_ranks": ranks}, method=method, error_feedback=True)
    serve(LocalGrid(2), cfg, tmp_path / "flower", node_wait=5)
    run(cfg, tmp_path / "inproc")
    assert_same_run(tmp_path / "flower", tmp_path / "inproc")
    plain = run(RunConfig(**{**tiny, "rounds": 3, "client_ranks": ranks}, method=method), tmp_path / "plain").history
    assert [m["bytes_down"] for m in read_metrics(tmp_path / "flower")] == [m["bytes_down"] for m in plain]


def test_a_node_that_lost_the_factors_it_kept_gets_them_again(tiny, tmp_path, caplog):
    """rolora sends each round only the frozen factor; a node keeps the other. A node whose state is gone (it
    restarted) fails the round, naming why, and next time the server sends it every factor that changed."""
    from florana.flower.client import GLOBAL_KEY
    from florana.flower.server import serve

    class Forgetful(LocalGrid):
        def send_and_receive(self, messages, timeout=None):
            for msg in messages:
                if msg.metadata.message_type == MessageType.TRAIN and msg.content["config"]["round"] == 2:
                    self.contexts[100].state = RecordDict()  # node 100 (partition 0) restarted
            return super().send_and_receive(messages, timeout)

    cfg = RunConfig(**{**tiny, "rounds": 3}, method="rolora")
    grid = Forgetful(2)
    with caplog.at_level(logging.WARNING, logger="florana"):
        serve(grid, cfg, tmp_path / "flower", node_wait=5)
    history = read_metrics(tmp_path / "flower")
    assert [m["missing"] for m in history] == [[], [0], []]
    assert "it holds the global factors of round 0; the server's payload is for round 1" in caplog.text
    fed = Federation(cfg)
    size = {f: sum(t.numel() * 4 for k, t in fed.initial.items() if f".lora_{f}." in k) for f in "AB"}
    head = sum(t.numel() * 4 for k, t in fed.initial.items() if ".lora_" not in k)
    # round 3 sends both the frozen A; partition 0 also B, which changed in round 1 while it held nothing
    assert history[2]["bytes_down"] == 2 * (head + size["A"]) + size["B"]
    assert set(history[2]["local_accuracy"]) == {"0", "1"} and history[2]["relative_error"] < 1e-5
    kept = grid.contexts[100].state.array_records[GLOBAL_KEY]  # what it trained round 3 from: both factors again
    assert {k for k in kept.keys() if ".lora_" in k} == {k for k in fed.initial if ".lora_" in k}


@pytest.mark.parametrize("method", sorted(m for m in METHODS if METHODS[m].mixed_ranks))
def test_flower_moves_what_the_ledger_books_with_mixed_ranks(tiny, tmp_path, method):
    """Clients of ranks 2, 4, 2 (client_ranks cycled): every node trains, uploads and downloads at its own rank
    through the real strategy and ClientApp, and the Flower run equals the in-process one bit for bit."""
    from florana.flower.server import serve

    cfg = RunConfig(**{**tiny, "num_clients": 3, "rounds": 3, "sample_fraction": 0.67, "client_ranks": [2, 4]},
                    method=method)
    serve(LocalGrid(3), cfg, tmp_path / "flower", node_wait=5)
    run(cfg, tmp_path / "inproc")
    assert_same_run(tmp_path / "flower", tmp_path / "inproc")
    sampled = [set(m["clients"]) for m in read_metrics(tmp_path / "flower")]
    assert any(1 in c for c in sampled) and any(c & {0, 2} for c in sampled)  # both ranks took part


def test_a_resumed_flower_run_restarts_what_nodes_kept(tiny, tmp_path):
    """A resumed run is a new Flower run, and Flower gives it fresh node states: fedsa's personal B is lost (its
    clients restart from the initial B), exactly that and nothing else. The engine with its personal state
    dropped at the same point reproduces the resumed run."""
    from florana.federation.engine import close_run, open_run, record_round
    from florana.flower.server import serve

    cfg = RunConfig(**{**tiny, "rounds": 3}, method="fedsa")
    out = tmp_path / "flower"
    serve(LocalGrid(2), RunConfig(**{**tiny, "rounds": 1}, method="fedsa"), out, node_wait=5)
    (out / "config.toml").write_text(cfg.to_toml())  # the same run, stopped after round 1 of 3
    serve(LocalGrid(2), None, out, resume=True, node_wait=5)  # new nodes' states, as in a new Flower run

    expected = tmp_path / "expected"
    run(RunConfig(**{**tiny, "rounds": 1}, method="fedsa"), expected)
    (expected / "config.toml").write_text(cfg.to_toml())
    fed, start = open_run(None, expected, resume=True)
    assert start == 2 and set(fed.personal) == {0, 1}  # the in-process checkpoint keeps every client's B ...
    fed.personal.clear()  # ... which a resumed Flower run does not have
    for r in range(start, 4):
        record_round(fed, expected, fed.round(r))
    close_run(fed, expected)
    assert_same_outputs(out, expected)


def test_flwr_resume_names_the_run_config_values_it_ignores(tiny, tmp_path, caplog):
    """`flwr run` hands over every key, defaults included; resume=true keeps the stored config and says which of
    the values it was given differ, instead of dropping them silently."""
    from flwr.app import Context

    from florana.flower import server

    out = tmp_path / "run"
    run(RunConfig(**{**tiny, "rounds": 1}, method="svd"), out)
    (out / "config.toml").write_text(RunConfig(**tiny, method="svd").to_toml())  # stopped after round 1 of 2
    run_config = {**flower_run_config(RunConfig(**tiny, method="florana")), "resume": True, "run-dir": str(out),
                  "node-wait": 5.0}
    with caplog.at_level(logging.WARNING, logger="florana"):
        server.main(LocalGrid(2), Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                                          run_config=run_config))
    assert "these run-config values differ and are ignored: method 'svd' → 'florana'" in caplog.text
    assert [m["method"] for m in read_metrics(out)] == ["svd", "svd"]


@pytest.mark.parametrize("method", ["fedex", "svd"])
def test_a_flower_checkpoint_resumes_in_process(tiny, tmp_path, method):
    """The other direction of checkpoint compatibility: rounds 1..2 on Flower, 3 in process, equal to a whole
    in-process run (fedex carries the base delta and who holds which base through the checkpoint)."""
    from florana.flower.server import serve

    cfg = RunConfig(**{**tiny, "rounds": 3}, method=method)
    out = tmp_path / "mixed"
    serve(LocalGrid(2), RunConfig(**{**tiny, "rounds": 2}, method=method), out, node_wait=5)
    (out / "config.toml").write_text(cfg.to_toml())
    run(None, out, resume=True)
    run(cfg, tmp_path / "inproc")
    assert_same_outputs(out, tmp_path / "inproc")


def reply_from(node: int, content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    """A node's reply as the server receives it (what a Grid hands back), built without a Flower run."""
    return Message(content, metadata=Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0,
                                              reply_to_message_id="m", group_id="", created_at=0.0, ttl=60.0,
                                              message_type=message_type))


def closed_round(cfg: RunConfig, run_dir: Path, counts: dict[int, object]) -> tuple[Federation, dict]:
    """Round 1 of `cfg` closed by the Flower server from fabricated replies: partition u's node (id 100 + u)
    sends a fixed update and reports counts[u] training examples."""
    fed = Federation(cfg)
    strategy = FloranaStrategy(fed, run_dir, first_round=1, min_nodes=1, node_wait=1.0)
    strategy.nodes = {u: 100 + u for u in counts}
    strategy.pending = {"metrics": fed.open_round(1, sorted(counts), []), "t0": time.perf_counter(), "down": 0}
    replies = []
    for u, count in counts.items():
        g = torch.Generator().manual_seed(u)
        update = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in fed.initial.items()}
        replies.append(reply_from(100 + u, RecordDict({"update": to_record(update), "metrics": MetricRecord(
            {"partition-id": u, "num-examples": count, "loss": 0.5, "local-accuracy": 0.5})})))
    strategy.aggregate_train(1, replies)
    return fed, read_metrics(run_dir)[0]


def test_the_server_weighs_partitions_by_its_own_count_not_the_nodes(tiny, tmp_path, caplog):
    """FedAvg weights: a node reporting a huge, negative or NaN example count neither dominates nor stops the
    round; the server uses its own partition sizes and names the node that disagreed."""
    cfg = RunConfig(**{**tiny, "num_clients": 3}, method="fedit", weighting="examples")
    honest, _ = closed_round(cfg, tmp_path / "honest", {u: Federation(cfg).data.clients[u].size for u in range(3)})
    caplog.set_level(logging.WARNING, logger="florana")
    fed, metrics = closed_round(cfg, tmp_path / "lying", {0: 10**9, 1: -5, 2: float("nan")})
    assert metrics["missing"] == [] and metrics["rejected"] == []
    assert all(torch.equal(fed.global_tensors[k], honest.global_tensors[k]) for k in honest.global_tensors)
    for u, said in ((0, "1000000000"), (1, "-5"), (2, "nan")):
        assert f"node {100 + u} (partition {u}) reported {said} training examples, the server counts " \
               f"{fed.data.clients[u].size}" in caplog.text


class QueryGrid:
    """A Grid stand-in for the partition query: node → (partition-id, num-partitions); only `awake` nodes answer."""

    def __init__(self, partitions: dict[int, tuple[int, int]]):
        self.partitions, self.awake, self.asked = partitions, set(partitions), []

    def get_node_ids(self) -> list[int]:
        return list(self.partitions)

    def send_and_receive(self, messages, timeout):
        asked = sorted(m.metadata.dst_node_id for m in messages)
        self.asked.append(asked)
        return [reply_from(n, RecordDict({"metrics": MetricRecord(dict(zip(("partition-id", "num-partitions"),
                                                                          self.partitions[n])))}), MessageType.QUERY)
                for n in asked if n in self.awake]


def test_a_node_silent_to_the_partition_query_is_named_and_asked_again(monkeypatch, tmp_path, caplog):
    """Only a node whose partition does not fit is ignored for good; one that does not answer in time is named
    in a warning and asked again at the next round."""
    for identity in ("_run_id", "_task_id", "_node_id"):  # the ServerApp's identity, which Flower sets
        monkeypatch.setattr(TaskIdentity, identity, 1)
    caplog.set_level(logging.WARNING, logger="florana")
    strategy = FloranaStrategy(SimpleNamespace(config=RunConfig(num_clients=2)), tmp_path, first_round=1,
                               min_nodes=1, node_wait=1.0)
    grid = QueryGrid({10: (0, 2), 11: (1, 2), 12: (1, 5)})
    grid.awake = {10, 12}
    strategy.discover(grid, timeout=3.0, strict=False)
    assert strategy.nodes == {0: 10} and strategy.ignored == {12}
    assert "node 11 did not say which partition it holds (no answer within 3s); it will be asked again" in caplog.text
    assert "node 12: partition-id=1 num-partitions=5 does not fit the run's num_clients=2; node 12 ignored" \
        in caplog.text
    grid.awake = {10, 11, 12}
    strategy.discover(grid, timeout=3.0, strict=False)
    assert strategy.nodes == {0: 10, 1: 11} and grid.asked == [[10, 11, 12], [11]]


def test_num_clients_from_the_nodes_and_a_misfit_stops_the_run_at_once(monkeypatch, tmp_path):
    """num_clients=0 takes the nodes' num-partitions, which must agree; with a num_clients the nodes do not fit,
    waiting for more nodes is pointless: the run stops as soon as a node says so, not after node-wait."""
    for identity in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, identity, 1)
    assert nodes_num_partitions(QueryGrid({10: (0, 2), 11: (1, 2)}), wait=1.0) == 2
    with pytest.raises(FloranaError, match=r"num-partitions differ or are < 1 \(node 10: 2, node 11: 3\)"):
        nodes_num_partitions(QueryGrid({10: (0, 2), 11: (1, 3)}), wait=1.0)
    strategy = FloranaStrategy(SimpleNamespace(config=RunConfig(num_clients=3)), tmp_path, first_round=1,
                               min_nodes=1, node_wait=120.0)
    t0 = time.monotonic()
    with pytest.raises(FloranaError, match="node 1[01]: partition-id=[01] num-partitions=2 does not fit the run's "
                                           "num_clients=3"):
        strategy.wait_for_nodes(QueryGrid({10: (0, 2), 11: (1, 2)}))
    assert time.monotonic() - t0 < 5


# ---- simulation -------------------------------------------------------------------------------------
def test_simulation_agrees_with_the_in_process_engine(tiny, tmp_path):
    """`florana run --runtime flower`: fedsa keeps B in each node's context state (flora's simulation, which sends
    the merged base weights, is test_flwr_run_dot's)."""
    method = "fedsa"
    cfg = RunConfig(**tiny, method=method)
    (tmp_path / "cfg.toml").write_text(cfg.to_toml())
    done = subprocess.run([sys.executable, "-m", "florana", "run", "--runtime", "flower", "--config",
                           str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "flower"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run(cfg, tmp_path / "inproc")
    assert_same_run(tmp_path / "flower", tmp_path / "inproc")
    plots = {p.name for p in (tmp_path / "flower" / "plots").glob("*.png")}
    assert plots == {p.name for p in (tmp_path / "inproc" / "plots").glob("*.png")} and "bytes.png" in plots
    assert "accuracy.png" not in plots  # fedsa has no global model to score
    assert len(list((tmp_path / "flower" / "checkpoints").glob("round-*"))) == 2
    assert_no_leftovers("RAY_TMPDIR", os.environ["RAY_TMPDIR"])


def test_simulation_refuses_the_bounds(tiny, tmp_path):
    (tmp_path / "cfg.toml").write_text(RunConfig(**tiny, method="centralized").to_toml())
    done = subprocess.run([sys.executable, "-m", "florana", "run", "--runtime", "flower", "--config",
                           str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert done.returncode == 2 and "reference bound" in done.stderr and not (tmp_path / "x").exists()


def test_flwr_run_dot(tiny, tmp_path):
    """The project is a Flower app: `flwr run . --stream` (in a copy of what its FAB carries) simulates it, config
    keys through --run-config. flora: the merged base weights go to the nodes too."""
    home = tmp_path / "flwr-home"
    env = flower_env(home)
    cfg = RunConfig(**tiny, method="flora")
    overrides = tmp_path / "run-config.toml"
    overrides.write_text(tomli_w.dumps({**flower_run_config(cfg), "run-dir": str(tmp_path / "flower")}))
    try:
        done = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", ".", "--stream",
                               "--federation-config", "num-supernodes=2", "--run-config", str(overrides)],
                              cwd=app_copy(tmp_path / "app", {}), env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    finally:  # `flwr run` leaves a local SuperLink running, detached: stop it and its helpers by pid
        for pid in pids_with_env("FLWR_HOME", str(home)):
            os.kill(pid, 9)
    run(cfg, tmp_path / "inproc")
    assert_same_run(tmp_path / "flower", tmp_path / "inproc")
    assert_no_leftovers("RAY_TMPDIR", os.environ["RAY_TMPDIR"])


def app_copy(root: Path, config: dict) -> Path:
    """This Flower app (what its FAB carries: stage_app) in `root`, its declared defaults updated with `config`:
    `flwr run .` there runs on a small config, and its relative run folders stay there."""
    stage_app(ROOT, root)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project["tool"]["flwr"]["app"]["config"].update(config)
    (root / "pyproject.toml").write_text(tomli_w.dumps(project))
    return root


def log_time(run_log: str, level: str) -> datetime:
    """When run.log first logged at `level`."""
    return datetime.strptime(re.search(rf"^(\S+ \S+) {level} ", run_log, re.M).group(1), "%Y-%m-%d %H:%M:%S,%f")


def test_flwr_run_dot_out_of_the_box(tiny, tmp_path):
    """`flwr run . --stream` with nothing else, in a fresh FLWR_HOME: Flower's default local federation (2 simulated
    SuperNodes) sets num_clients; the run folder lands in the folder `flwr run` started the local SuperLink from.
    A run whose nodes do not fit stops within seconds, with the error on the terminal and in `flwr ls`."""
    app = app_copy(tmp_path / "app", {k: v for k, v in tiny.items() if k != "num_clients"})
    home = tmp_path / "flwr-home"
    env = {**flower_env(home), "PYTHONPATH": str(ROOT / "src"),  # the ServerApp and ClientApps run this code
           # a local SuperLink of our own, which never meets another FLWR_HOME's on Flower's fixed ports
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    before = sorted(ROOT.glob("runs/flower-*"))
    flwr = str(Path(sys.executable).parent / "flwr")
    try:
        done = subprocess.run([flwr, "run", ".", "--stream"], cwd=app, env=env, capture_output=True, text=True,
                              timeout=300)
        out = done.stdout + done.stderr
        assert done.returncode == 0 and "(2 simulated SuperNodes)" in out, out[-3000:]
        assert "florana INFO: num_clients=0: 2 clients, one per partition the nodes hold" in out
        run_id = re.search(r"Successfully started run (\d+)", out).group(1)
        run_dir = app / "runs" / f"flower-{run_id}"
        cfg = RunConfig(**tiny)  # num_clients=2, as the nodes said
        assert tomllib.loads((run_dir / "config.toml").read_text()) == tomllib.loads(cfg.to_toml())
        run(cfg, tmp_path / "inproc")
        assert_same_run(run_dir, tmp_path / "inproc")

        # the same federation with num_clients=3: no node fits, which stops the run at once (not after node-wait)
        t0 = time.monotonic()
        done = subprocess.run([flwr, "run", ".", "--stream", "--run-config", "num_clients=3"], cwd=app, env=env,
                              capture_output=True, text=True, timeout=300)
        seconds, out = time.monotonic() - t0, done.stdout + done.stderr
        assert re.search(r"florana ERROR: node \d+: partition-id=\d num-partitions=2 does not fit the run's "
                         r"num_clients=3", out), out[-3000:]
        assert done.returncode == 0 and seconds < 120  # Flower 1.42's `flwr run` exits 0 whatever the run did
        failed_id = re.search(r"Successfully started run (\d+)", out).group(1)
        run_log = (app / "runs" / f"flower-{failed_id}" / "run.log").read_text()
        assert (log_time(run_log, "ERROR") - log_time(run_log, "INFO")).total_seconds() < 30, run_log
        listed = subprocess.run([flwr, "ls", "--format", "json"], cwd=app, env=env, capture_output=True, text=True,
                                timeout=60)
        status = {r["run-id"]: r["status"] for r in json.loads(listed.stdout)["runs"]}
        assert status == {run_id: "finished:completed", failed_id: "finished:failed"}, listed.stdout
    finally:  # `flwr run` leaves the local SuperLink running, detached: stop it and its helpers by pid
        for pid in pids_with_env("FLWR_HOME", str(home)):
            os.kill(pid, 9)
    assert sorted(ROOT.glob("runs/flower-*")) == before  # nothing written into the repository
    assert_no_leftovers("FLWR_HOME", str(home))


# ---- deployment -------------------------------------------------------------------------------------
def test_loopback_deployment_with_tls_and_node_auth(tiny, tmp_path):
    """Two rounds on a SuperLink with TLS and 2 authenticated SuperNodes equal the in-process run; a SuperNode whose
    key was never registered is turned away. (A plain deployment is the too-few-nodes test's, which also ends equal
    to the in-process run.)"""
    cfg = RunConfig(**tiny, method="florana")
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(certs), "3"], check=True,
                   capture_output=True)
    with Loopback(tmp_path / "home", 2, certs=certs, auth=True).start() as federation:
        rogue = federation.start_node(1, key=certs / "node-2", name="rogue")
        federation.run(ROOT, cfg, tmp_path / "flower", round_timeout=120)
        assert rogue.poll() is None or rogue.returncode != 0
        nodes = federation.flwr("supernode", "list", "loopback").stdout
        assert nodes.count("online") == 2 and "Connection attempt failed" in \
            (tmp_path / "home" / "logs" / "rogue.log").read_text()
    assert_no_leftovers("FLWR_HOME", str(tmp_path.resolve() / "home" / "flwr"))
    run(cfg, tmp_path / "inproc")
    assert_same_run(tmp_path / "flower", tmp_path / "inproc")


def test_a_7b_adapter_crosses_the_loopback_deployment(tmp_path):
    """A synthetic LoRA adapter of LLaMA-2-7B's shapes (r=16 on q, k, v, o: 67.1 MB in float32) goes server → node
    → server through a real SuperLink and SuperNode in florana's wire format, and comes back bit for bit."""
    from florana.flower.wirecheck import write_app

    app, out = write_app(tmp_path / "app"), tmp_path / "wirecheck.json"
    with Loopback(tmp_path / "home", 1).start() as federation:
        federation.flwr("run", str(app), "loopback", "--stream", "--run-config", f"out='{out}' repeats=1",
                        timeout=300)
    assert_no_leftovers("FLWR_HOME", str(tmp_path.resolve() / "home" / "flwr"))
    report = json.loads(out.read_text())
    assert report["bytes_each_way_per_node"] == 32 * 4 * 2 * 16 * 4096 * 4 and report["replies"] == [1]
    print(f"67.1 MB adapter round trip: {report['adapter_s'][0]:.1f} s; a tiny payload's: {report['tiny_s'][0]:.1f} s")


def kill_when_round_starts(federation: Loopback, run_dir: Path, round_: int, node: int) -> threading.Thread:
    """Kill SuperNode `node` (kill -9, its whole process group) once the server has sent round `round_`."""
    def watch():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            log = run_dir / "run.log"
            if log.is_file() and f"round {round_}: " in log.read_text():
                time.sleep(0.5)
                federation.kill_node(node)
                return
            time.sleep(0.2)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_killed_supernode_the_round_completes_with_the_rest(tiny, tmp_path):
    cfg = RunConfig(**{**tiny, "num_clients": 3, "rounds": 1, "local_steps": 4})
    out = tmp_path / "flower"
    with Loopback(tmp_path / "home", 3).start() as federation:
        killer = kill_when_round_starts(federation, out, 1, 2)
        federation.run(ROOT, cfg, out, min_nodes=2, round_timeout=40)  # a ClientApp process start takes seconds on a busy machine
        killer.join()
    (m,) = read_metrics(out)
    assert m["clients"] == [0, 1, 2] and m["missing"] == [2] and set(m["local_accuracy"]) == {"0", "1"}
    assert (out / "global_adapter" / "adapter_model.safetensors").is_file()
    assert "no reply from partition(s) [2]" in (out / "run.log").read_text()
    assert_no_leftovers("FLWR_HOME", str(tmp_path.resolve() / "home" / "flwr"))


def test_too_few_nodes_stops_the_run_and_resume_finishes_it(tiny, tmp_path):
    cfg = RunConfig(**tiny, method="florana")
    out = tmp_path / "flower"
    with Loopback(tmp_path / "home", 2).start() as federation:
        killer = kill_when_round_starts(federation, out, 2, 1)
        with pytest.raises(FloranaError, match="fewer than min-nodes=2"):
            federation.run(ROOT, cfg, out, min_nodes=2, round_timeout=40)  # a ClientApp process start takes seconds on a busy machine
        killer.join()
    assert "round 2: 1 of 2 sampled node(s) replied, fewer than min-nodes=2" in (out / "run.log").read_text()
    assert sorted(p.name for p in (out / "checkpoints").glob("round-*")) == ["round-0001"]
    assert [m["round"] for m in read_metrics(out)] == [1]
    with Loopback(tmp_path / "home2", 2).start() as federation:  # new nodes, same run folder
        federation.run(ROOT, cfg, out, resume=True, round_timeout=120)
    run(cfg, tmp_path / "inproc")
    assert_same_run(out, tmp_path / "inproc")
    assert_no_leftovers("FLWR_HOME", str(tmp_path.resolve() / "home" / "flwr"))
    assert_no_leftovers("FLWR_HOME", str(tmp_path.resolve() / "home2" / "flwr"))


def test_a_node_that_does_not_fit_the_run_is_named(tiny, tmp_path):
    cfg = RunConfig(**tiny)
    out = tmp_path / "flower"
    with Loopback(tmp_path / "home", 2) as federation:
        federation.start_superlink()
        federation.start_node(0)
        federation.start_node(1, node_config="partition-id=1 num-partitions=5")
        with pytest.raises(FloranaError, match=r"node \d+: partition-id=1 num-partitions=5 does not fit the "
                                               r"run's num_clients=2"):
            federation.run(ROOT, cfg, out, round_timeout=60)
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("round-*"))
    assert_no_leftovers("FLWR_HOME", str(tmp_path.resolve() / "home" / "flwr"))


def test_simulation_resumes_a_run_from_its_checkpoint(tiny, tmp_path):
    """`florana run --runtime flower --resume RUN` continues from the last checkpoint, here one written by the
    in-process engine after round 1 of 2, and ends where an uninterrupted run ends."""
    cfg = RunConfig(**tiny, method="svd")
    out = tmp_path / "flower"
    run(RunConfig(**{**tiny, "rounds": 1}, method="svd"), out)
    (out / "config.toml").write_text(cfg.to_toml())  # the same run, stopped after round 1 of 2
    done = subprocess.run([sys.executable, "-m", "florana", "run", "--runtime", "flower", "--resume", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "resuming" in (out / "run.log").read_text()
    run(cfg, tmp_path / "inproc")
    history = read_metrics(out)
    assert [m["round"] for m in history] == [1, 2] and "flower_bytes_up" in history[1]
    assert_same_outputs(out, tmp_path / "inproc")
    assert_no_leftovers("RAY_TMPDIR", os.environ["RAY_TMPDIR"])
