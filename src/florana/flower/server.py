"""The ServerApp: florana's aggregation as a Flower strategy, writing the same run folder as the engine.

`FloranaStrategy` subclasses FedAvg and replaces its two halves of a round: `configure_train` samples
partitions with the engine's seeded sampler and sends each node what the engine's `Federation.downlink` says its
method sends (its share of the global adapter; for flora/fedex the base change the node lacks); `aggregate_train` turns the replies into the engine's `LocalResult`s and closes the
round with `Federation.close_round`, i.e. the same aggregator, evaluation and ledger as the in-process run.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from florana.config import RunConfig, describe, differences
from florana.errors import FloranaError
from florana.federation.engine import Federation, LocalResult, close_run, open_run, record_round, resumed_config
from florana.federation.methods import BOUNDS
from florana.flower.wire import (CLIENTS_FROM_NODES, check_sendable, from_record, partition_problem, record_bytes,
                                 split_run_config, to_record)

log = logging.getLogger("florana")

ANY_CLIENTS = 1 << 16  # a client count no config check refuses, for num_clients=0 before the nodes said theirs
QUERY_TIMEOUT_MIN = 30.0  # seconds a node gets to answer the partition query, however little node-wait is left


def check_runtime(config: RunConfig) -> None:
    if config.method in BOUNDS:
        raise FloranaError(f"method {config.method!r} is a reference bound that pools or never shares client data; "
                           "run it in process (without --runtime flower)")


def example_weight(fed: Federation, round_: int, node: int, u: int, reported) -> int:
    """Partition u's aggregation weight: the server's own count of its training examples (it splits the same data
    with the same seed). A node's reported count is only compared, never used: a lying or broken node cannot
    outweigh the others or stop the run."""
    size = fed.data.clients[u].size
    if reported != size:
        log.warning("round %d: node %d (partition %d) reported %r training examples, the server counts %d; the "
                    "server's count is the weight", round_, node, u, reported, size)
    return size


def nodes_num_partitions(grid: Grid, wait: float) -> int:
    """The number of partitions the connected nodes hold (their num-partitions), which num_clients=0 stands for;
    waits up to `wait` s for a node to answer. Nodes that disagree stop the run."""
    deadline = time.monotonic() + wait
    while True:
        nodes = list(grid.get_node_ids())
        answers = ask_partitions(grid, nodes, max(deadline - time.monotonic(), QUERY_TIMEOUT_MIN)) if nodes else {}
        sizes = {node: a[1] for node, a in answers.items() if not isinstance(a, str)}
        if sizes:
            break
        if time.monotonic() >= deadline:
            why = "".join(f"; node {node}: {a}" for node, a in sorted(answers.items()))
            raise FloranaError(f"num_clients=0 takes the number of clients from the nodes' num-partitions, but no "
                               f"node said which partition it holds within {wait:.0f}s ({len(nodes)} connected{why})")
        time.sleep(0.5)
    if len(set(sizes.values())) > 1 or min(sizes.values()) < 1:
        said = ", ".join(f"node {node}: {n}" for node, n in sorted(sizes.items()))
        raise FloranaError(f"num_clients=0 takes the number of clients from the nodes, but their num-partitions "
                           f"differ or are < 1 ({said}); give every node the same num-partitions or set num_clients")
    return next(iter(sizes.values()))


def ask_partitions(grid: Grid, nodes: list[int], timeout: float) -> dict[int, tuple[int, int] | str]:
    """Ask `nodes` which partition each holds (a query message). For each node that replied within `timeout` s:
    (partition-id, num-partitions), or why its reply says neither (its error, or a malformed answer)."""
    replies = grid.send_and_receive([Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n)
                                     for n in nodes], timeout=timeout)
    answers: dict[int, tuple[int, int] | str] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            answers[node] = reply.error.reason
            continue
        m = reply.content.metric_records.get("metrics", {})
        u, n = m.get("partition-id"), m.get("num-partitions")
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (u, n))
        answers[node] = (u, n) if ok else f"malformed answer {dict(m)}"
    return answers


class FloranaStrategy(FedAvg):
    """FedAvg's round structure with florana's sampling, payloads and aggregation."""

    def __init__(self, fed: Federation, run_dir: Path, *, first_round: int, min_nodes: int, node_wait: float):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        self.fed, self.run_dir, self.first_round = fed, run_dir, first_round
        self.min_nodes, self.node_wait = min_nodes, node_wait
        self.config_text = fed.config.to_toml()
        self.nodes: dict[int, int] = {}  # partition-id → node id
        self.ignored: set[int] = set()  # node ids that do not fit the run
        self.pending: dict = {}

    # ---- nodes --------------------------------------------------------------------------------------
    def discover(self, grid: Grid, timeout: float, strict: bool) -> None:
        """Ask every node not yet known which partition it holds. A node whose partition does not fit the run is
        an error before the first round (strict) and is ignored, with a warning, once rounds run; a node that does
        not answer in time (or answers with an error) is named in a warning and asked again next time."""
        unknown = [n for n in grid.get_node_ids() if n not in self.nodes.values() and n not in self.ignored]
        if not unknown:
            return
        answers = ask_partitions(grid, unknown, timeout)
        online = set(grid.get_node_ids())
        for node in unknown:
            answer = answers.get(node, f"no answer within {timeout:.0f}s")
            if isinstance(answer, str):
                log.warning("node %d did not say which partition it holds (%s); it will be asked again", node, answer)
                continue
            u, n = answer
            problem = partition_problem(node, u, n, self.fed.config.num_clients)
            if problem is None and u in self.nodes and self.nodes[u] in online:
                problem = f"nodes {self.nodes[u]} and {node} both claim partition-id={u}"
            if problem and strict:
                raise FloranaError(f"{problem} (the nodes' num-partitions and num_clients must agree; with `flwr run`, "
                                   "num_clients=0 takes it from the nodes)")
            if problem:
                log.warning("%s; node %d ignored", problem, node)
                self.ignored.add(node)
                continue
            self.nodes[u] = node

    def wait_for_nodes(self, grid: Grid) -> None:
        """Ask nodes which partition they hold as they connect, for up to node-wait seconds or until there is one
        per partition; a node that does not fit stops the run at once (waiting would not change it). Go on with
        fewer nodes if min-nodes are there."""
        wanted, deadline = self.fed.config.num_clients, time.monotonic() + self.node_wait
        while True:
            self.discover(grid, timeout=max(deadline - time.monotonic(), QUERY_TIMEOUT_MIN), strict=True)
            if len(self.nodes) >= wanted or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if len(self.nodes) < min(self.min_nodes, wanted):
            raise FloranaError(f"only {len(self.nodes)} node(s) connected within {self.node_wait:.0f}s "
                               f"(min-nodes={self.min_nodes}, num_clients={wanted})")
        if len(self.nodes) < wanted:
            log.warning("partitions without a node: %s", sorted(set(range(wanted)) - set(self.nodes)))

    # ---- a round ------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        round_ = server_round + self.first_round - 1
        t0, fed = time.perf_counter(), self.fed
        sampled, empty = fed.sample(round_)
        self.discover(grid, timeout=60.0, strict=False)
        online = set(grid.get_node_ids())
        reachable = [u for u in sampled if self.nodes.get(u) in online]
        metrics = fed.open_round(round_, sampled, empty)
        # payloads differ only in rank, the base change and (rolora, fedsvd) the factors a node missed: each
        # serialised once
        records: dict[tuple, dict[str, ArrayRecord]] = {}
        messages, down = [], 0
        for u in reachable:
            held = fed.held.get(u, 0)  # the round whose global factors the node holds, before this download
            payload = fed.downlink(u, metrics)
            part = {kind: {k.split("::", 1)[1]: v for k, v in payload.items() if k.startswith(f"{kind}::")}
                    for kind in ("global", "base")}
            key = (fed.ranks[u], frozenset(part["global"]), frozenset(k.rsplit(".", 1)[1] for k in part["base"]))
            if key not in records:
                records[key] = {kind: to_record(t) for kind, t in part.items() if t or kind == "global"}
            content = RecordDict({"config": ConfigRecord({"toml": self.config_text, "round": round_,
                                                          "base-round": fed.base_round, "held-round": held}),
                                  **records[key]})
            check_sendable(content, f"round {round_}: the message to node {self.nodes[u]} (partition {u})")
            messages.append(Message(content, message_type=MessageType.TRAIN, dst_node_id=self.nodes[u]))
            down += sum(record_bytes(r) for r in records[key].values())
        self.pending = {"metrics": metrics, "t0": t0, "down": down}
        log.info("round %d: %d partition(s) sampled, %d sent to nodes", round_, len(sampled), len(reachable))
        return messages

    def aggregate_train(self, server_round: int, replies):
        fed, pending = self.fed, self.pending
        metrics, round_ = pending["metrics"], pending["metrics"]["round"]
        partition_of = {node: u for u, node in self.nodes.items()}
        results: dict[int, LocalResult] = {}
        up = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            u = partition_of.get(node)
            if reply.has_error() or u is None:
                log.warning("round %d: node %s (partition %s) failed: %s", round_, node, u,
                            reply.error.reason if reply.has_error() else "unknown node")
                continue
            update = reply.content.array_records.get("update")
            received = 0 if update is None else record_bytes(update)
            up += received
            try:
                m = reply.content.metric_records["metrics"]
                loss, accuracy = float(m["loss"]), m.get("local-accuracy")
            except (KeyError, TypeError, ValueError) as e:
                log.warning("round %d: node %d (partition %d) sent no usable metrics (%s); reply ignored",
                            round_, node, u, e)
                continue
            try:
                expected = fed.wire_keys(fed.for_client(fed.initial, u), up=True, round_=round_)  # at its rank
                tensors = None if update is None else from_record(update, expected, f"node {node} (partition {u})")
            except FloranaError as e:
                log.warning("round %d: %s; update rejected", round_, e)
                tensors = None
            weight = example_weight(fed, round_, node, u, m.get("num-examples"))
            results[u] = LocalResult(loss, tensors, accuracy, weight, received)
        metrics["missing"] = sorted(set(metrics["clients"]) - set(results))
        for u in metrics["missing"]:  # its state is unknown now: it gets the whole base delta and every changed
            fed.synced[u] = -1  # global factor next time
            fed.held[u] = 0
        if metrics["missing"]:
            log.warning("round %d: no reply from partition(s) %s", round_, metrics["missing"])
        if len(results) < min(self.min_nodes, len(metrics["clients"])):
            raise FloranaError(
                f"round {round_}: {len(results)} of {len(metrics['clients'])} sampled node(s) replied, fewer than "
                f"min-nodes={self.min_nodes} (missing partitions {metrics['missing']}); the run stops here and "
                f"resumes after round {round_ - 1} with resume=true")
        metrics = fed.close_round(metrics, results, pending["t0"])
        metrics["flower_bytes_down"], metrics["flower_bytes_up"] = pending["down"], up
        record_round(fed, self.run_dir, metrics)
        return to_record(fed.global_tensors), MetricRecord({"replies": len(results)})


def serve(grid: Grid, config: RunConfig | None, run_dir: Path, *, resume: bool = False, min_nodes: int = 1,
          round_timeout: float = 3600.0, node_wait: float = 120.0) -> None:
    """A whole run on a Flower grid: open (or resume) the run folder, find the nodes, run the rounds, write the
    global adapter and plots."""
    run_dir = Path(run_dir).resolve()
    if config is not None:
        check_runtime(config)
    try:
        fed, start = open_run(config, run_dir, resume=resume)
        check_runtime(fed.config)
        fed.synced.clear()  # the nodes of a new Flower run hold no base change and only the initial global factors,
        fed.held.clear()  # whatever a checkpoint says
        log.info("run folder %s, rounds %d..%d", run_dir, start, fed.config.rounds)
        if start <= fed.config.rounds:
            strategy = FloranaStrategy(fed, run_dir, first_round=start, min_nodes=min_nodes, node_wait=node_wait)
            strategy.wait_for_nodes(grid)
            strategy.start(grid, to_record(fed.global_tensors), num_rounds=fed.config.rounds - start + 1,
                           timeout=round_timeout)
        close_run(fed, run_dir)
    except FloranaError as e:  # the run log says why the run stopped, wherever the ServerApp ran
        log.error("%s", e)
        raise


def server_app(config: RunConfig | None, run_dir: Path, **options) -> ServerApp:
    """A ServerApp bound to one config and run folder (what `florana run --runtime flower` simulates)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, config, run_dir, **options)

    return app


app = ServerApp()


def show_on_terminal() -> None:
    """Send florana's log to stderr as well, which Flower streams to `flwr run --stream`: the run folder, each round
    and any error then show on the terminal that submitted the run, not only in run.log."""
    if not any(getattr(h, "florana_terminal", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.florana_terminal = True
        handler.setFormatter(logging.Formatter("florana %(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .`: florana's config keys and the runtime keys come from the run config. num_clients=0 (the
    app's default) becomes the nodes' num-partitions before round 1, so Flower's default federation just runs."""
    show_on_terminal()
    run_config = dict(context.run_config)
    try:
        # every key checked before nodes are asked, num_clients=0 standing for as many clients as client_ranks lists
        config, runtime = split_run_config(run_config, num_partitions=ANY_CLIENTS)
        run_dir = Path(str(runtime["run-dir"]).replace("{run_id}", str(context.run_id)))
        if runtime["resume"]:  # Flower hands over every key, defaults included: say which ones are not used
            stored = resumed_config(run_dir.resolve())
            ignored = {k: v for k, v in differences(stored, config).items()
                       if not (k == "num_clients" and run_config.get(k) == CLIENTS_FROM_NODES)}
            if ignored:
                log.warning("resume=true continues %s with its stored config; these run-config values differ and are "
                            "ignored: %s (to extend a run: florana run --resume RUN --rounds N)", run_dir,
                            describe(ignored))
            config = None
        elif run_config.get("num_clients") == CLIENTS_FROM_NODES:
            n = nodes_num_partitions(grid, float(runtime["node-wait"]))
            config, _ = split_run_config(run_config, num_partitions=n)
            log.info("num_clients=0: %d clients, one per partition the nodes hold", n)
    except FloranaError as e:
        log.error("%s", e)
        raise
    serve(grid, config, run_dir, resume=bool(runtime["resume"]), min_nodes=int(runtime["min-nodes"]),
          round_timeout=float(runtime["round-timeout"]), node_wait=float(runtime["node-wait"]))
