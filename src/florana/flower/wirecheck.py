"""Can this federation carry a large adapter? A Flower app that sends every node a synthetic LoRA adapter of a real
model's shapes (default: LLaMA-2-7B, r=16 on q, k, v, o: 32 layers, hidden 4096, 67.1 MB in float32) through
florana's wire format (wire.py), has it sent back, checks every array came back bit for bit and times the round
trips, next to round trips of a tiny payload (Flower's fixed cost per message, polling and process start-up).

    florana.flower.wirecheck.write_app(DIR)   # a Flower app folder whose components are this module's apps
    flwr run DIR CONNECTION --stream --run-config "out='/abs/result.json' layers=32 hidden=4096 rank=16"

The ServerApp writes a JSON report to `out` (benchmarks/wire_roundtrip.py and tests/test_flower.py use it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from florana.errors import FloranaError
from florana.flower.wire import check_sendable, from_record, record_bytes, to_record

DEFAULTS = {"layers": 32, "hidden": 4096, "rank": 16, "repeats": 2, "out": "wirecheck.json", "node-wait": 60.0}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def synthetic_adapter(layers: int, hidden: int, rank: int, seed: int = 0) -> dict[str, Tensor]:
    """PEFT-named LoRA tensors of a LLaMA-style model (square q, k, v, o projections), float32, seeded."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        for m in MODULES:
            name = f"base_model.model.model.layers.{i}.self_attn.{m}"
            out[f"{name}.lora_A.weight"] = torch.randn(rank, hidden, generator=g)
            out[f"{name}.lora_B.weight"] = torch.randn(hidden, rank, generator=g)
    return out


def _shape(config) -> tuple[int, int, int]:
    return int(config["layers"]), int(config["hidden"]), int(config["rank"])


client = ClientApp()


@client.train()
def echo(msg: Message, context: Context) -> Message:
    """Read the adapter as a florana node reads its download (keys, shapes and dtypes checked) and send it back."""
    like = synthetic_adapter(*_shape(msg.content["config"]))
    back = from_record(msg.content["adapter"], like, "server message")
    content = RecordDict({"adapter": to_record(back)})
    check_sendable(content, f"node {context.node_id}: its reply")
    return Message(content, reply_to=msg)


server = ServerApp()


def round_trip(grid: Grid, nodes: list[int], content: RecordDict, timeout: float) -> tuple[float, list[Message]]:
    t0 = time.perf_counter()
    messages = [Message(content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    return time.perf_counter() - t0, replies


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = {**DEFAULTS, **dict(context.run_config)}
    shape = _shape(config)
    deadline = time.monotonic() + float(config["node-wait"])
    while not (nodes := list(grid.get_node_ids())) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not nodes:
        raise FloranaError(f"no node connected within {config['node-wait']}s")
    adapter = synthetic_adapter(*shape)
    shape_record = ConfigRecord(dict(zip(("layers", "hidden", "rank"), shape)))
    big = RecordDict({"config": shape_record, "adapter": to_record(adapter)})
    tiny = RecordDict({"config": ConfigRecord({"layers": 1, "hidden": 8, "rank": 1}),
                       "adapter": to_record(synthetic_adapter(1, 8, 1))})
    check_sendable(big, "the wire check's message")
    report = {"nodes": len(nodes), "bytes_each_way_per_node": record_bytes(big["adapter"]), "tiny_s": [],
              "adapter_s": [], "shape": dict(zip(("layers", "hidden", "rank"), shape))}
    round_trip(grid, nodes, tiny, 600)  # warm-up: the first message of a run pays for installing the app
    for _ in range(int(config["repeats"])):
        seconds, _ = round_trip(grid, nodes, tiny, 600)
        report["tiny_s"].append(seconds)
        seconds, replies = round_trip(grid, nodes, big, 1800)
        report["adapter_s"].append(seconds)
        for reply in replies:
            if reply.has_error():
                raise FloranaError(f"node {reply.metadata.src_node_id} failed: {reply.error.reason}")
            back = from_record(reply.content["adapter"], adapter, f"node {reply.metadata.src_node_id}")
            if not all(torch.equal(back[k], adapter[k]) for k in adapter):
                raise FloranaError(f"node {reply.metadata.src_node_id} sent back a different adapter")
        report.setdefault("replies", []).append(len(replies))
    Path(str(config["out"])).write_text(json.dumps(report, indent=1))


def write_app(directory: Path, **config) -> Path:
    """A Flower app folder (pyproject.toml only) whose ServerApp and ClientApp are this module's, with `config`
    (keys of DEFAULTS) as its run config's defaults; `flwr run` it against any federation with florana installed."""
    import tomli_w

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "florana-wirecheck", "version": "0.1.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "florana",
                                  "components": {"serverapp": "florana.flower.wirecheck:server",
                                                 "clientapp": "florana.flower.wirecheck:client"},
                                  "config": {**DEFAULTS, **config}}}}}))
    return directory
