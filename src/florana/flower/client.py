"""The ClientApp: a Flower SuperNode's side of a florana round.

The server sends the run config, its method's share of the global adapter and, for flora/fedex, the change of
the base weights the node lacks; the node trains its own partition with the engine's `Federation.local_update`
and replies with what its method uploads, and metrics. What a node keeps between rounds (fedsa's personal B, the
base delta of flora/fedex, the global factors rolora and fedsvd do not send every round) lives in Flower's per-node
context state. A node computes on the run's device unless its node config names its own (`device="cuda:1"` in
flower-supernode's --node-config): where a node trains is the node's business. A node may also bring its own data
(`data-path`, flower/nodedata.py) and its own copy of the base model (`model-path`, checked by hash:
flower/handshake.py).
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor

from florana.config import RunConfig
from florana.errors import FloranaError
from florana.federation.engine import Federation
from florana.flower.handshake import model_hash, versions
from florana.flower.nodedata import (in_run_labels, load_node_examples, node_data_of, node_split, own_split,
                                     present_labels)
from florana.flower.secagg import in_secure_round, masked_reply, secagg_mod
from florana.flower.wire import (base_change_from_record, check_sendable, config_from_text, from_record,
                                 partition_problem, to_record)
from florana.lora.base_delta import REPLACE, apply_change, total_change

log = logging.getLogger("florana")

PERSONAL_KEY = "florana.personal"
BASE_KEY, BASE_ROUND_KEY = "florana.base-delta", "florana.base-round"
GLOBAL_KEY, GLOBAL_ROUND_KEY = "florana.global", "florana.global-round"

app = ClientApp(mods=[secagg_mod])  # SecAgg+ (Flower's own mod) for the rounds of a run with secagg=true

# the Federation this process serves (model + data), by (Flower run id, run config, node device, pinned model,
# node data, client slot); every load is appended to LOADS (a test sees the cache at work, a benchmark counts
# the loads a run paid)
_worker: dict[tuple, Federation] = {}
LOADS: list[tuple] = []


def node_config_of(config_text: str, context: Context) -> RunConfig:
    """The run config the server sent, on the device the node config names (its `device` key) and with the base
    model from its `model-path` (checked against the server's by hash before round 1), where it names them."""
    config = config_from_text(config_text, "server message")
    node, overrides = context.node_config, {}
    if "device" in node:
        overrides["device"] = node["device"]
    if "model-path" in node:
        overrides["model"] = node["model-path"]
    try:
        return config.with_overrides(**overrides)
    except FloranaError as e:
        raise FloranaError(f"node {context.node_id}: its node config's {e}") from None


def worker(config_text: str, context: Context, u: int) -> Federation:
    """This process's Federation (the base model and the data) for the message's run, as client u: loaded once per
    (run id, run config, node device, pinned model, node data, slot), the config naming the model, dtype,
    quantization and device, and kept for the next message of that run; a message of another run evicts it. A
    process keeps it as long as Flower keeps the process: a Ray actor of the simulation serves many nodes and rounds
    of a run; a deployment (Flower 1.42) starts a fresh flwr-clientapp process for every message, so there each
    message loads it (README, "Large models over Flower"). Nothing of a message outlives it: `train` writes the whole
    adapter from the message and the node's state, sets the base delta and the personal part each time, and the
    frozen base weights are never written (a base change is added in the forward pass). A node with its own data
    loads only that, into slot u."""
    node = context.node_config
    own = node.get("data-path")  # its data sits in slot u; a partition node's Federation serves every slot
    key = (context.run_id, config_text, node.get("device"), node.get("model-path"), own, u if own else None)
    if key not in _worker:
        _worker.clear()
        LOADS.append(key)
        config = node_config_of(config_text, context)
        data = node_data_of(node, context.node_id)
        split = None
        if data is not None:
            examples = in_run_labels(load_node_examples(data, config, context.node_id), config, context.node_id)
            split = node_split(config, examples, u, data.test_fraction)
        _worker[key] = Federation(config, split=split, secret_dp=True)  # the server knows the run's seed
    return _worker[key]


def client_of(msg: Message, context: Context, num_clients: int) -> int:
    """The client slot this node trains as: its partition-id, or (own data) the slot the server gave it."""
    if node_data_of(context.node_config, context.node_id) is not None:
        return int(msg.content["config"]["client"])
    u, n = partition_of(context)
    if problem := partition_problem(context.node_id, u, n, num_clients):
        raise FloranaError(problem)
    return u


def partition_of(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, checked."""
    node = context.node_config
    try:
        return int(node["partition-id"]), int(node["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise FloranaError(f"node {context.node_id}: its node config needs integer partition-id and num-partitions "
                           f"(flower-supernode --node-config 'partition-id=0 num-partitions=N'), got "
                           f"{dict(node)}") from None


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (or that it has its own data), so that it can sample clients
    as the engine does; with the run config, also the versions it runs, its pinned model's hash, and for its own
    data the count of training examples and, if the run has no label list yet, its label names. Nothing else of
    the data: no text, no histogram."""
    node, info = context.node_config, {**versions()}
    data = node_data_of(node, context.node_id)
    metrics = {"node-data": 1} if data is not None else dict(zip(("partition-id", "num-partitions"),
                                                                   partition_of(context)))
    if "config" in msg.content.config_records:
        config = config_from_text(str(msg.content["config"]["toml"]), "server message")
        if "model-path" in node:
            info["model-hash"] = model_hash(str(node["model-path"]))
        if data is not None:
            examples = load_node_examples(data, config, context.node_id)
            if config.task == "classification" and not config.labels:
                info["labels"] = present_labels(examples)
            else:
                try:
                    examples = in_run_labels(examples, config, context.node_id)
                except FloranaError as e:
                    info["problem"] = str(e)
            metrics["num-examples"] = len(own_split(examples, config, data.test_fraction)[0])
    content = RecordDict({"metrics": MetricRecord(metrics), "node": ConfigRecord(info)})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's partition from what the server sent (its method's share of the global adapter, and the
    base change where the method has one), reply with the method's upload; keep the personal part in the node."""
    config = msg.content["config"]
    run_config = config_from_text(str(config["toml"]), "server message")
    u = client_of(msg, context, run_config.num_clients)
    fed = worker(str(config["toml"]), context, u)
    round_ = int(config["round"])
    mine = fed.for_client(fed.initial, u)  # the shapes of this client's adapter, at its own rank
    shared = node_global(fed, context, msg.content["global"], int(config["held-round"]), round_, mine)
    fed.slots.set_base_delta(node_base_delta(fed, context, msg, int(config["base-round"])))
    fed.personal = {}
    if PERSONAL_KEY in context.state.array_records:
        kept = context.state.array_records[PERSONAL_KEY]
        fed.personal[u] = from_record(kept, {k: mine[k] for k in kept.keys()}, f"node {context.node_id} state")
    result, kept = fed.local_update(u, fed.client_start(u, round_, shared), round_)
    metrics = {"partition-id": u, "num-examples": result.size, "loss": float(result.loss)}
    if result.local_accuracy is not None:  # none when the client holds no test examples or was rejected
        metrics["local-accuracy"] = float(result.local_accuracy)
    if result.local_majority is not None and node_data_of(context.node_config, context.node_id) is None:
        metrics["local-majority"] = float(result.local_majority)  # a node's own data: no label statistic leaves it
    if fed.config.secagg:  # the update goes only into the masked sum; a plain reply is never sent
        if not in_secure_round(msg):
            raise FloranaError(f"node {context.node_id}: the run has secagg=true, but the server's train message "
                               "is not part of a SecAgg+ round; the node sends no plain update")
        content = masked_reply(fed, u, result, metrics, round_, context.node_id)
    else:
        content = RecordDict({"metrics": MetricRecord(metrics)})
        if result.tensors is not None:
            content["update"] = to_record(result.tensors)
    if kept:
        context.state[PERSONAL_KEY] = to_record(kept)
    check_sendable(content, f"node {context.node_id}: its reply")
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model the server sent (its adapter and, for flora/fedex, its whole base delta) on this
    node's held-out part; the node's own state is left as it was."""
    config = msg.content["config"]
    u = int(config["client"])
    fed = worker(str(config["toml"]), context, u)
    tensors = from_record(msg.content["global"], fed.initial, "server message")
    shapes = {m: (fed.initial[f"{m}.lora_B.weight"].shape[0], fed.initial[f"{m}.lora_A.weight"].shape[1])
              for m in fed.modules}
    record = msg.content.array_records.get("base")
    fed.slots.set_base_delta({} if record is None else
                             apply_change({}, base_change_from_record(record, shapes, "server message")))
    test = fed.data.clients[u].test
    scores = fed.evaluate(tensors, test)
    metrics = {"num-test": len(test), **{f"global-{k}": float(v) for k, v in scores.items()
                                         if k in ("accuracy", "loss") and v is not None}}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def node_global(fed: Federation, context: Context, record, held_round: int, round_: int,
                mine: dict[str, Tensor]) -> dict[str, Tensor]:
    """The global tensors this node trains from. Most methods send all they share every round. rolora and fedsvd
    send what changed (the factor frozen this round, a refreshed A), so the node keeps the global factors in its
    state and adds what the server sent to the ones it holds from round `held_round`, when it last downloaded
    (0: it holds the initial ones). A node whose state is not at that round (e.g. it restarted) fails the round, and
    the server sends it every factor that changed next time. `mine`: the client's adapter tensors at its own rank,
    which give the shapes the payload must have."""
    allowed = fed.wire_keys(mine, up=False)
    if not fed.method.varies:
        return from_record(record, allowed, "server message")
    sent = from_record(record, allowed, "server message", subset=True)
    state = context.state
    have = int(state.config_records[GLOBAL_ROUND_KEY]["round"]) if GLOBAL_ROUND_KEY in state.config_records else 0
    kept = {}
    if held_round:
        if have != held_round:
            raise FloranaError(f"node {context.node_id}: it holds the global factors of round {have}; the server's "
                               f"payload is for round {held_round} (it will send every changed factor)")
        kept = from_record(state.array_records[GLOBAL_KEY], allowed, "node state", subset=True)
    merged = {**kept, **sent}
    state[GLOBAL_KEY] = to_record(merged)
    state[GLOBAL_ROUND_KEY] = ConfigRecord({"round": round_})
    return merged


def node_base_delta(fed: Federation, context: Context, msg: Message, base_round: int) -> dict[str, Tensor]:
    """This node's base delta brought to the server's `base_round` by the change the server sent, and kept in the
    node's state for the next round. A node whose state does not match the change (e.g. it restarted) fails the
    round, and the server sends it the whole delta next time."""
    if not fed.changes_base:
        return {}
    state = context.state
    have = int(state.config_records[BASE_ROUND_KEY]["round"]) if BASE_ROUND_KEY in state.config_records else 0
    shapes = {m: (fed.initial[f"{m}.lora_B.weight"].shape[0], fed.initial[f"{m}.lora_A.weight"].shape[1])
              for m in fed.modules}  # (d, k) of each module's ΔW
    delta = apply_change({}, base_change_from_record(state.array_records[BASE_KEY], shapes, "node state")) \
        if BASE_KEY in state.array_records else {}
    record = msg.content.array_records.get("base")
    change = {} if record is None else base_change_from_record(record, shapes, "server message")
    replaces = any(k.endswith(f".{REPLACE}") for k in change)
    if not replaces and have != (base_round - 1 if change else base_round):
        raise FloranaError(f"node {context.node_id}: its base delta is at round {have}; the server's change is for "
                           f"round {base_round - 1 if change else base_round} (it will send the whole delta)")
    delta = apply_change(delta, change)
    state[BASE_KEY] = to_record(total_change(delta))
    state[BASE_ROUND_KEY] = ConfigRecord({"round": base_round})
    return delta
