"""The ServerApp: florana's aggregation as a Flower strategy, writing the same run folder as the engine.

`FloranaStrategy` subclasses FedAvg and replaces its two halves of a round: `configure_train` samples
partitions with the engine's seeded sampler and sends each node what the engine's `Federation.downlink` says its
method sends (its share of the global adapter; for flora/fedex the base change the node lacks); `aggregate_train` turns the replies into the engine's `LocalResult`s and closes the
round with `Federation.close_round`, i.e. the same aggregator, evaluation and ledger as the in-process run.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from florana.config import RunConfig, describe
from florana.errors import FloranaError
from florana.data import load_examples
from florana.federation.checkpoint import write_text_atomic
from florana.federation.folders import holding
from florana.federation.engine import (BudgetSpent, Client, Federation, LocalResult, close_run, open_run,
                                       record_round, resumed_config)
from florana.federation.methods import BOUNDS, run_differences
from florana.flower.handshake import base_model_folder, hash_problem, model_hash, version_problem, versions
from florana.flower.nodedata import agree_labels, check_count, server_split
from florana.flower.secagg import SecureRound, sum_weight, upload_bytes
from florana.flower.wire import (CLIENTS_FROM_NODES, check_sendable, from_record, partition_problem, record_bytes,
                                 split_run_config, to_record)
from florana.lora.base_delta import total_change

log = logging.getLogger("florana")

ANY_CLIENTS = 1 << 16  # a client count no config check refuses, for num_clients=0 before the nodes said theirs
QUERY_TIMEOUT_MIN = 30.0  # seconds a node gets to answer the partition query, however little node-wait is left
OWN_DATA = "it has its own data"  # what ask_partitions says of a node with a data-path
REPLY_POLL = 0.2  # seconds between pulls while a message wave waits for its replies


class PromptGrid:
    """Flower's grid, its send_and_receive pulling the replies every REPLY_POLL s: Flower 1.42's deployment grid
    sleeps 3 s between pulls, so every wave of messages (a round, the nodes' query) ended up to 3 s after its last
    reply. The rest is the grid's own."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        """Push `messages`, then pull their replies until all came or `timeout` s passed (None: no limit)."""
        waiting = set(self.grid.push_messages(messages))
        end, replies = time.monotonic() + (timeout or 0.0), []
        while waiting:
            arrived = list(self.grid.pull_messages(waiting))
            replies += arrived
            waiting -= {m.metadata.reply_to_message_id for m in arrived}
            if not waiting or (timeout is not None and time.monotonic() >= end):
                break
            time.sleep(REPLY_POLL)
        return replies


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
        sizes = {node: a[1] for node, a in answers.items() if isinstance(a, tuple)}
        if sizes:
            break
        own = [node for node, a in answers.items() if a == OWN_DATA]
        if own:  # only nodes with their own data: one client each (set num_clients if they connect at other times)
            return len(own)
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


def counts(config: RunConfig) -> bool:
    """Whether a node's own count of training examples matters to the server: as its weight, or to account its
    sample-level DP (the sample rate and δ come from it)."""
    return config.weighting == "examples" or config.dp == "sample"


@dataclass
class Hello:
    """A node's answer to the server's query: the partition it holds, or that it has its own data (with its count
    of training examples and, when asked, its label names); the versions it runs, its pinned model's hash, and a
    problem it found with the run (e.g. a label the run does not know)."""

    partition: tuple[int, int] | None = None
    count: object = None
    labels: list[str] | None = None
    versions: dict = field(default_factory=dict)
    model_hash: str | None = None
    problem: str | None = None

    @property
    def own(self) -> bool:
        return self.partition is None


def parse_hello(content: RecordDict) -> Hello | str:
    """A hello reply's content → Hello, or why it is malformed."""
    m = content.metric_records.get("metrics", {})
    info = dict(content.config_records.get("node", {}))
    hello = Hello(count=m.get("num-examples"), versions={k: info[k] for k in ("florana", "torch", "transformers")
                                                         if k in info},
                  model_hash=info.get("model-hash"), problem=info.get("problem"))
    if "labels" in info:
        hello.labels = [str(x) for x in info["labels"]]
    if m.get("node-data") == 1:
        return hello
    u, n = m.get("partition-id"), m.get("num-partitions")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (u, n)):
        return f"malformed answer {dict(m)}"
    hello.partition = (u, n)
    return hello


def ask_nodes(grid: Grid, nodes: list[int], timeout: float, config_text: str | None = None) -> dict[int, Hello | str]:
    """Ask `nodes` which partition each holds or whether it has its own data (a query message; with the run
    config, also its versions, model hash and, for own data, its count and label names). For each node that
    replied within `timeout` s: its Hello, or why its reply gives none (its error, or a malformed answer)."""
    def content() -> RecordDict:
        return RecordDict() if config_text is None else RecordDict({"config": ConfigRecord({"toml": config_text})})
    replies = grid.send_and_receive([Message(content(), message_type=MessageType.QUERY, dst_node_id=n)
                                     for n in nodes], timeout=timeout)
    answers: dict[int, Hello | str] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        answers[node] = reply.error.reason if reply.has_error() else parse_hello(reply.content)
    return answers


def ask_partitions(grid: Grid, nodes: list[int], timeout: float) -> dict[int, tuple[int, int] | str]:
    """(partition-id, num-partitions) of each node that answered in time with a partition, or why not."""
    answers = ask_nodes(grid, nodes, timeout)
    return {n: a if isinstance(a, str) else OWN_DATA if a.own else a.partition for n, a in answers.items()}


def survey(grid: Grid, config: RunConfig, wait: float) -> dict[int, Hello | str]:
    """Every node's hello with the run config, before the run starts: asked until num_clients nodes answered, one
    of them holds a partition that does not fit, or `wait` s passed."""
    deadline, text, answers = time.monotonic() + wait, config.to_toml(), {}
    while True:
        new = [n for n in grid.get_node_ids() if not isinstance(answers.get(n), Hello)]
        if new:
            answers.update(ask_nodes(grid, new, max(deadline - time.monotonic(), QUERY_TIMEOUT_MIN), text))
        ok = [a for a in answers.values() if isinstance(a, Hello)]
        misfit = any(a.partition and partition_problem(0, *a.partition, config.num_clients) for a in ok)
        if len(ok) >= config.num_clients or misfit or time.monotonic() >= deadline:
            return answers
        time.sleep(0.5)


def agreed_config(config: RunConfig, answers: dict[int, Hello | str]) -> RunConfig:
    """The run config with the label list the nodes with their own data need: the config's own `labels`, or the
    union of the names they reported (and, in a mixed federation, the run dataset's)."""
    own = {n: a for n, a in answers.items() if isinstance(a, Hello) and a.own}
    if not own or config.task != "classification" or config.labels:
        return config
    shared = any(isinstance(a, Hello) and not a.own for a in answers.values())
    names = load_examples(config.dataset, text_column=config.text_column, label_column=config.label_column,
                          max_examples=config.max_examples, seed=config.seed).label_names if shared else None
    labels = agree_labels({n: a.labels or [] for n, a in own.items()}, names)
    log.info("labels: %s, from the names %d node(s) reported (set labels in the run config to keep them private)",
             labels, len(own))
    return config.with_overrides(labels=labels)


class FloranaStrategy(FedAvg):
    """FedAvg's round structure with florana's sampling, payloads and aggregation."""

    def __init__(self, fed: Federation, run_dir: Path, *, first_round: int, min_nodes: int, node_wait: float,
                 round_timeout: float = 3600.0):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        self.fed, self.run_dir, self.first_round = fed, run_dir, first_round
        self.min_nodes, self.node_wait, self.round_timeout = min_nodes, node_wait, round_timeout
        self.config_text = fed.config.to_toml()
        self.nodes: dict[int, int] = {}  # partition-id → node id
        self.ignored: set[int] = set()  # node ids that do not fit the run
        self.own: dict[int, int] = {}  # client slot → the training examples its node's own data has (its word)
        self.pending: dict = {}
        self.versions = versions()
        self._base_hash: list = []  # the base model's content hash, computed once a node pins its model

    def base_hash(self) -> str | None:
        if not self._base_hash:
            folder = base_model_folder(self.fed.config.model)
            self._base_hash.append(None if folder is None else model_hash(folder))
        return self._base_hash[0]

    # ---- nodes --------------------------------------------------------------------------------------
    def discover(self, grid: Grid, timeout: float, strict: bool) -> None:
        """Ask every node not yet known which partition it holds. A node whose partition does not fit the run is
        an error before the first round (strict) and is ignored, with a warning, once rounds run; a node that does
        not answer in time (or answers with an error) is named in a warning and asked again next time."""
        unknown = [n for n in grid.get_node_ids() if n not in self.nodes.values() and n not in self.ignored]
        if unknown:
            answers = ask_nodes(grid, unknown, timeout, self.config_text)
            self.admit(grid, {n: answers.get(n, f"no answer within {timeout:.0f}s") for n in unknown}, unknown, strict)

    def admit(self, grid: Grid, answers: dict[int, Hello | str], asked: list[int], strict: bool) -> None:
        """Give each node that answered its client slot (its partition-id, or for own data the highest free slot),
        after checking its versions, pinned model and example count."""
        online = set(grid.get_node_ids())
        config = self.fed.config
        for node in asked:
            answer = answers.get(node, "no answer")
            if isinstance(answer, str):
                log.warning("node %d did not say which partition it holds (%s); it will be asked again", node, answer)
                continue
            problem = answer.problem or self.check_node(node, answer)
            u = None
            if problem is None and answer.own:
                free = [v for v in range(config.num_clients) if v not in self.nodes or self.nodes[v] not in online]
                u = max(free, default=None)
                problem = None if u is not None else f"node {node} has its own data, but every client slot is taken"
            elif problem is None:
                u, n = answer.partition
                problem = partition_problem(node, u, n, config.num_clients)
                if problem is None and u in self.nodes and self.nodes[u] in online:
                    problem = f"nodes {self.nodes[u]} and {node} both claim partition-id={u}"
                if problem and strict:
                    problem += " (the nodes' num-partitions and num_clients must agree; with `flwr run`, " \
                               "num_clients=0 takes it from the nodes)"
            if problem and strict:
                raise FloranaError(problem)
            if problem:
                log.warning("%s; node %d ignored", problem, node)
                self.ignored.add(node)
                continue
            self.nodes[u] = node
            if answer.own:
                reported = check_count(node, answer.count, config.max_examples_per_node) if counts(config) else 1
                count = reported if config.weighting == "examples" else 1
                self.own[u] = count
                self.fed.data.clients[u] = Client(self.fed.data.clients[u].train.subset([]),
                                                  self.fed.data.clients[u].test.subset([]), count)
                self.fed.data.stats[u] = {"client": u, "node_data": True}
                self.fed.join_private(u, reported)  # its σ_u, q_u, δ_u: as the node plans them from its count
                log.info("node %d: its own data, client %d", node, u)

    def check_node(self, node: int, answer: Hello) -> str | None:
        """Why a node cannot join (a pinned model that is not the base, other versions with strict_versions, a
        malformed count), or None; other versions without strict_versions are a warning naming the node."""
        if answer.versions and (problem := version_problem(node, self.versions, answer.versions)):
            if self.fed.config.strict_versions:
                return f"{problem} (strict_versions = true)"
            log.warning("%s", problem)
        if answer.model_hash is not None and \
                (problem := hash_problem(node, self.base_hash(), answer.model_hash, self.fed.config.model)):
            return problem
        if answer.own and counts(self.fed.config):
            try:
                check_count(node, answer.count, self.fed.config.max_examples_per_node)
            except FloranaError as e:
                return str(e)
        return None

    def wait_for_nodes(self, grid: Grid, answers: dict[int, Hello | str] | None = None) -> None:
        """Ask nodes which partition they hold as they connect, for up to node-wait seconds or until there is one
        per partition; a node that does not fit stops the run at once (waiting would not change it). Go on with
        fewer nodes if min-nodes are there. `answers`: what the nodes already said (serve's survey)."""
        wanted, deadline = self.fed.config.num_clients, time.monotonic() + self.node_wait
        if answers:
            self.admit(grid, answers, sorted(answers), strict=True)
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
            content = RecordDict({"config": ConfigRecord({"toml": self.config_text, "round": round_, "client": u,
                                                          "base-round": fed.base_round, "held-round": held}),
                                  **records[key]})
            check_sendable(content, f"round {round_}: the message to node {self.nodes[u]} (partition {u})")
            messages.append(Message(content, message_type=MessageType.TRAIN, dst_node_id=self.nodes[u]))
            down += sum(record_bytes(r) for r in records[key].values())
        self.pending = {"metrics": metrics, "t0": t0, "down": down}
        log.info("round %d: %d partition(s) sampled, %d sent to nodes", round_, len(sampled), len(reachable))
        if fed.config.secagg:  # SecAgg+'s four exchanges carry the round (the train messages go out in the third)
            secure = SecureRound(fed, round_, self.round_timeout)
            secure.run(grid, messages, {node: u for u, node in self.nodes.items()})
            self.pending["secure"] = secure
            return []
        return messages

    def aggregate_train(self, server_round: int, replies):
        fed, pending = self.fed, self.pending
        metrics, round_ = pending["metrics"], pending["metrics"]["round"]
        secure = pending.get("secure")  # under SecAgg+: its replies carry metrics only, the mean is its own
        if secure is not None:
            replies = secure.replies
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
            received = upload_bytes(fed, round_) if secure else 0 if update is None else record_bytes(update)
            up += received
            try:
                m = reply.content.metric_records["metrics"]
                loss, accuracy, floor = float(m["loss"]), m.get("local-accuracy"), m.get("local-majority")
            except (KeyError, TypeError, ValueError) as e:
                log.warning("round %d: node %d (partition %d) sent no usable metrics (%s); reply ignored",
                            round_, node, u, e)
                continue
            try:
                expected = fed.wire_keys(fed.for_client(fed.initial, u), up=True, round_=round_)  # at its rank
                tensors = ({} if sum_weight(reply) > 0 else None) if secure else \
                    None if update is None else from_record(update, expected, f"node {node} (partition {u})")
            except FloranaError as e:
                log.warning("round %d: %s; update rejected", round_, e)
                tensors = None
            if u in self.own:  # the node's own data: its word, checked (uniform weighting needs none)
                try:
                    weight = check_count(node, m.get("num-examples"), fed.config.max_examples_per_node) \
                        if fed.config.weighting == "examples" else 1
                except FloranaError as e:
                    log.error("round %d: %s; update rejected", round_, e)
                    weight, tensors = 0, None
            else:
                weight = example_weight(fed, round_, node, u, m.get("num-examples"))
            results[u] = LocalResult(loss, tensors, accuracy, weight, received, floor)
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
        metrics = fed.close_round(metrics, results, pending["t0"], summed=secure.mean if secure else None)
        metrics["flower_bytes_down"], metrics["flower_bytes_up"] = pending["down"], up
        if self.scores_on_nodes():  # recorded once the nodes scored the new global model
            self.pending["closed"] = metrics
        else:
            record_round(fed, self.run_dir, metrics)
        return to_record(fed.global_tensors), MetricRecord({"replies": len(results)})

    # ---- the nodes score the global model on their own held-out parts -----------------------------------
    def scores_on_nodes(self) -> bool:
        """Nodes with their own data score each round's global model (where the method has one)."""
        method = self.fed.method
        return bool(self.own) and method is not None and not method.personal_B

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if "closed" not in self.pending:
            return []
        fed, online = self.fed, set(grid.get_node_ids())
        content = {"global": to_record(fed.global_tensors)}
        if fed.changes_base and fed.slots.base_delta:
            content["base"] = to_record(total_change(fed.slots.base_delta))
        self.pending["eval_down"] = sum(record_bytes(r) for r in content.values()) * len(self.own)
        return [Message(RecordDict({"config": ConfigRecord({"toml": self.config_text, "client": u}), **content}),
                        message_type=MessageType.EVALUATE, dst_node_id=self.nodes[u])
                for u in sorted(self.own) if self.nodes.get(u) in online]

    def aggregate_evaluate(self, server_round: int, replies):
        metrics = self.pending.pop("closed", None)
        if metrics is None:
            return None
        partition_of = {node: u for u, node in self.nodes.items()}
        scores, sizes = {}, {}
        for reply in replies:
            node = reply.metadata.src_node_id
            m = {} if reply.has_error() else reply.content.metric_records.get("metrics", {})
            acc, n = m.get("global-accuracy"), m.get("num-test")
            if node not in partition_of or not isinstance(acc, float) or not isinstance(n, int) or n < 0 \
                    or not 0 <= acc <= 1:
                log.warning("round %d: node %s did not score the global model (%s)", metrics["round"], node,
                            reply.error.reason if reply.has_error() else f"answer {dict(m)}")
                continue
            scores[str(partition_of[node])], sizes[str(partition_of[node])] = acc, n
        total = sum(sizes.values())
        metrics["node_global_accuracy"] = scores
        metrics["node_global_accuracy_mean"] = sum(scores[u] * sizes[u] for u in scores) / total if total else None
        metrics["flower_bytes_eval"] = self.pending.pop("eval_down", 0)
        record_round(self.fed, self.run_dir, metrics)
        return MetricRecord({"nodes": len(scores)})


def serve(grid: Grid, config: RunConfig | None, run_dir: Path, *, resume: bool = False, min_nodes: int = 1,
          round_timeout: float = 3600.0, node_wait: float = 120.0) -> None:
    """A whole run on a Flower grid: open (or resume) the run folder, find the nodes, run the rounds, write the
    global adapter and plots."""
    run_dir = Path(run_dir).resolve()
    if isinstance(grid, Grid):  # Flower's own grids (tests hand serve grids of their own, which have no pulls)
        grid = PromptGrid(grid)
    if config is not None:
        check_runtime(config)
    try:
        # every node says hello first: nodes with their own data decide the label list and what the server loads
        answers = survey(grid, config if config is not None else resumed_config(run_dir), node_wait)
        for answer in answers.values():  # a node whose data the run cannot take stops it before anything loads
            if isinstance(answer, Hello) and answer.problem:
                raise FloranaError(answer.problem)
        own = [a for a in answers.values() if isinstance(a, Hello) and a.own]
        if config is not None:
            config = agreed_config(config, answers)
        split = None
        if own:
            shared = any(isinstance(a, Hello) and not a.own for a in answers.values())
            split = lambda c: server_split(c, {}, shared)  # noqa: E731
        with holding(run_dir, new=not resume):  # one process runs a run folder at a time
            fed, start = open_run(config, run_dir, resume=resume, split=split, secret_dp=True)
            check_runtime(fed.config)
            fed.synced.clear()  # the nodes of a new Flower run hold no base change and only the initial global
            fed.held.clear()  # factors, whatever a checkpoint says
            log.info("run folder %s, rounds %d..%d", run_dir, start, fed.config.rounds)
            if start <= fed.config.rounds:
                strategy = FloranaStrategy(fed, run_dir, first_round=start, min_nodes=min_nodes,
                                           node_wait=node_wait, round_timeout=round_timeout)
                strategy.wait_for_nodes(grid, answers)
                if strategy.own:  # which slots hold nodes' own data (no sizes, no labels: those are theirs)
                    write_text_atomic(run_dir / "partition.json", json.dumps(fed.data.stats, indent=1))
                try:
                    strategy.start(grid, to_record(fed.global_tensors), num_rounds=fed.config.rounds - start + 1,
                                   timeout=round_timeout)
                except BudgetSpent:  # as in process: the rounds done are closed and kept, then the run says why
                    if fed.history:
                        close_run(fed, run_dir)
                    raise
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
            ignored = {k: v for k, v in run_differences(stored, config).items()
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
