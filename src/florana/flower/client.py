"""The ClientApp: a Flower SuperNode's side of a florana round.

The server sends the run config, the global adapter and (for flora/fedex) the adapted base weights; the node
trains its own partition with the engine's `Federation.local_update` and replies with its adapter tensors and
metrics. fedsa's personal B stays on the node, in Flower's per-node context state.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from florana.errors import FloranaError
from florana.federation.engine import Federation
from florana.flower.wire import config_from_text, from_record, partition_problem, to_record

log = logging.getLogger("florana")

PERSONAL_KEY = "florana.personal"

app = ClientApp()

# the Federation this process serves (model + data), rebuilt only when the run config changes
_worker: dict[str, Federation] = {}


def worker(config_text: str) -> Federation:
    """This process's Federation for the run config the server sent (a Ray worker serves many nodes and rounds)."""
    if config_text not in _worker:
        _worker.clear()
        _worker[config_text] = Federation(config_from_text(config_text, "server message"))
    return _worker[config_text]


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
    """Tell the server which partition this node holds, so that it can sample partitions as the engine does."""
    u, n = partition_of(context)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": u, "num-partitions": n})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this node's partition from the server's global adapter (and base), reply with the update."""
    fed = worker(str(msg.content["config"]["toml"]))
    round_ = int(msg.content["config"]["round"])
    u, n = partition_of(context)
    if problem := partition_problem(context.node_id, u, n, fed.config.num_clients):
        raise FloranaError(problem)
    fed.global_tensors = from_record(msg.content["global"], fed.initial, "server message")
    base = msg.content.array_records.get("base")
    fed.set_base_weights({} if base is None else from_record(base, fed.original_base, "server message"))
    fed.personal = {}
    if PERSONAL_KEY in context.state.array_records:
        kept = context.state.array_records[PERSONAL_KEY]
        fed.personal[u] = from_record(kept, {k: fed.initial[k] for k in kept.keys()}, f"node {context.node_id} state")
    result = fed.local_update(u, fed.client_start(u, round_), round_)
    metrics = {"partition-id": u, "num-examples": result.size, "loss": float(result.loss)}
    if result.local_accuracy is not None:  # none when the client holds no test examples or was rejected
        metrics["local-accuracy"] = float(result.local_accuracy)
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if result.tensors is not None:
        content["update"] = to_record(result.tensors)
        if kept := fed.personal_part(result.tensors):
            context.state[PERSONAL_KEY] = to_record(kept)
    return Message(content, reply_to=msg)
