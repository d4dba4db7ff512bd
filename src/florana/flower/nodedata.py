"""Node-local data: a SuperNode that trains on its own file instead of a partition of the run's dataset.

A node whose node config names `data-path` (a csv/json/jsonl/parquet file or a hub name; optional `text-column`,
`label-column`, `test-fraction`) loads only that data, holds out `test-fraction` of it to score the local and the
global model on, and trains on the rest. It never loads the run's dataset and never sends an example, a text or a
label histogram: only its method's upload, its count of training examples, losses and accuracies and, when the run
config gives no `labels`, its label names before round 1 (the server's union of them is the run's label list).

Such a node fills a client slot no partition node holds (the highest free one first, so that partition nodes keep
the low partition-ids in a mixed federation). The server weighs it by the count it reports, checked here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from florana.config import RunConfig
from florana.data import Examples, load_examples, relabel
from florana.errors import FloranaError


@dataclass(frozen=True)
class NodeData:
    """What a node's config says of its own data."""

    path: str
    text_column: str | None = None
    label_column: str | None = None
    test_fraction: float | None = None


def node_data_of(node_config, node: int) -> NodeData | None:
    """The node's own data from its node config (`data-path` and the optional keys), or None for a partition node."""
    if "data-path" not in node_config:
        return None
    path, fraction = node_config["data-path"], node_config.get("test-fraction")
    if not isinstance(path, str) or not path.strip():
        raise FloranaError(f"node {node}: data-path must be a file or a hub name, got {path!r}")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 <= fraction < 1):
        raise FloranaError(f"node {node}: test-fraction must be a number in [0, 1), got {fraction!r}")
    columns = {k: node_config.get(k) for k in ("text-column", "label-column")}
    for key, value in columns.items():
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise FloranaError(f"node {node}: {key} must be a column name, got {value!r}")
    return NodeData(path, columns["text-column"], columns["label-column"],
                    None if fraction is None else float(fraction))


def load_node_examples(data: NodeData, config: RunConfig, node: int) -> Examples:
    """The node's examples, read with the run's task and the node's own column names."""
    try:
        return load_examples(data.path, text_column=data.text_column or config.text_column,
                             label_column=data.label_column or config.label_column,
                             causal=config.task == "causal_lm", code=config.task == "code", seed=config.seed)
    except FloranaError as e:
        raise FloranaError(f"node {node}: its data-path {e}") from None


def classifies(config: RunConfig) -> bool:
    return config.task == "classification"


def present_labels(examples: Examples) -> list[str]:
    """The label names that occur in the examples (not a histogram: names only)."""
    return [examples.label_names[i] for i in sorted(set(np.unique(examples.labels).tolist()))]


def in_run_labels(examples: Examples, config: RunConfig, node: int) -> Examples:
    """The node's examples numbered in the run's label list; a label the run does not know is an error naming the
    node and the label."""
    if not classifies(config):
        return examples
    if not config.labels:
        raise FloranaError(f"node {node}: the run has no label list (the server sets labels before round 1)")
    return relabel(examples, config.labels, f"node {node}")


def own_split(examples: Examples, config: RunConfig, test_fraction: float | None) -> tuple[Examples, Examples]:
    """The node's training part and held-out part (at most client_test_max), fixed by the run's seed."""
    from florana.federation.engine import derive_seed

    fraction = config.client_test_fraction if test_fraction is None else test_fraction
    order = np.random.default_rng(derive_seed(config.seed, 9)).permutation(len(examples))
    n_test = int(round(fraction * len(order))) if len(order) > 1 else 0
    return examples.subset(order[n_test:]), examples.subset(order[:n_test][: config.client_test_max])


def empty_like(names: list[str]) -> Examples:
    return Examples([], np.zeros(0, dtype=int), names)


def node_split(config: RunConfig, examples: Examples, u: int, test_fraction: float | None):
    """A node's view of the run: its own data in client slot u, every other slot empty, no global test set."""
    from florana.federation.engine import Split

    names = list(config.labels) if classifies(config) else examples.label_names
    train, test = own_split(examples, config, test_fraction)
    trains, tests = [empty_like(names)] * config.num_clients, [empty_like(names)] * config.num_clients
    trains[u], tests[u] = train, test
    stats = [{"client": v, "size": len(trains[v])} for v in range(config.num_clients)]
    return Split(None, trains, tests, stats, names)


def server_split(config: RunConfig, own: dict[int, int], shared: bool):
    """The server's view of a run with node-local data: slots in `own` (slot → reported training examples) hold a
    node's own data, which the server never sees; the others, where `shared`, partitions of the run's dataset. The
    only global test set is server_test_data."""
    from florana.federation.engine import Split, load_split, load_test

    if shared:
        split = load_split(config.with_overrides(server_test_data=""))
        names = split.label_names
    else:
        names = list(config.labels) if classifies(config) else ["all"]
        split = Split(None, [empty_like(names)] * config.num_clients, [empty_like(names)] * config.num_clients,
                      [{"client": v, "size": 0} for v in range(config.num_clients)], names)
    for u in own:
        split.trains[u], split.tests[u] = empty_like(names), empty_like(names)
        split.stats[u] = {"client": u, "node_data": True}  # its size and labels are the node's own business
    split.test = load_test(config, names) if config.server_test_data else None
    return split


def agree_labels(named: dict[int, list[str]], shared: list[str] | None = None) -> list[str]:
    """The run's label list from the names the nodes reported (and the shared dataset's, in a mixed federation):
    their union, in the order a single file's labels take (shortest first, then alphabetical)."""
    union = set(shared or [])
    for names in named.values():
        union.update(names)
    if not union:
        raise FloranaError("no node reported a label name: the run needs labels (set labels = [...] in the run "
                           "config)")
    return sorted(union, key=lambda s: (len(s), s))


def check_count(node: int, count, bound: int) -> int:
    """A node's reported number of training examples, which becomes its weight: a non-negative integer, at most
    `bound` (max_examples_per_node; 0: no bound). Anything else is an error naming the node."""
    ok = isinstance(count, (int, np.integer)) and not isinstance(count, bool) or \
        isinstance(count, float) and math.isfinite(count) and count.is_integer()
    if not ok or count < 0:
        raise FloranaError(f"node {node} reported {count!r} training examples: a count must be a non-negative "
                           "integer")
    if bound and count > bound:
        raise FloranaError(f"node {node} reported {int(count)} training examples, more than max_examples_per_node="
                           f"{bound}")
    return int(count)
