"""Drop-in Flower strategies: FedAvg whose aggregation of a PEFT LoRA adapter is a florana method.

For Flower apps of their own (FlowerTune's shape): ClientApps that reply with an `ArrayRecord` of their PEFT state
dict (`get_peft_model_state_dict`) and a `MetricRecord` with `num-examples`, and load the global `ArrayRecord`
with `set_peft_model_state_dict`. Only the strategy line of the ServerApp changes. The aggregation is
`florana.aggregate`'s code path (aggregation/adapters.py), so a round equals `florana aggregate` on the same
adapters. Unlike `florana.flower.server.FloranaStrategy`, it needs no florana run config, data or model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from florana.aggregation.registry import get_method
from florana.api import AggregateReport, _adapter_of, _aggregate, _config_dict
from florana.errors import FloranaError
from florana.lora.adapter import LORA_A, at_rank, module_scaling

# methods whose clients change their frozen base weights every round: a ClientApp that only loads the global
# ArrayRecord cannot follow them
BASE_CHANGING = {"flora": "merge the stacked update into its base weights and restart LoRA every round",
                 "fedex": "add the dense residual to its base weights every round"}


class FloranaLoRA(FedAvg):
    """FedAvg with the LoRA factors aggregated by a florana method; every other array (heads, modules_to_save)
    FedAvg-averaged, with the same weights.

    Parameters (besides FedAvg's, which keep their meaning and defaults)
    ----------
    method : str (default: "florana")
        fedit, florana, svd, lora_fair, hetlora, flexlora, ffa, fedsa, rolora, fedsvd. ffa and fedsvd clients train
        B only (A frozen at the shared init); rolora clients train B in odd rounds and A in even ones; fedsa clients
        load only A and other tensors of the global record and keep their own B
        (`florana.client_helpers.client_part`). flora and fedex change the clients' base weights each round and are
        refused here (use `florana.aggregate` in your own loop, or `florana run --runtime flower`).
    lora_config : peft.LoraConfig or dict (required)
        The clients' LoRA configuration: it sets each module's scaling (lora_alpha / r, rslora, alpha_pattern).
    options : dict (default: None)
        The method's own options (lora_fair: lam, steps, lr; fedsvd: period; florana: solver, steps, lr, prox,
        gauge; svd: split).
    uniform_weights : bool (default: False)
        Weigh every client alike (the FLoRA-NA paper's choice) instead of by `weighted_by_key` ("num-examples"),
        which replies then need not carry.

    Nodes of different ranks (for the methods that accept them): from the round after its first reply, a node
    receives the global adapter at its own rank (to train and to evaluate); in the first round every node receives
    `initial_arrays`.

    The returned MetricRecord holds FedAvg's averaged client metrics and, per round, `aggregation-error` (‖ΔW* −
    ΔŴ‖_F / ‖ΔW*‖_F), `aggregation-error-floor` (the best rank-r estimate's), `aggregation-fedit-error`,
    `aggregation-bytes-up`/`-down` (what the method's protocol moves, all clients) and `flower-bytes-up` (the array
    bytes the replies carried). `reports[server_round]` keeps each round's full `AggregateReport`. A reply that
    cannot be aggregated (an A without its B, shapes or keys unlike the others', NaN or Inf, a bad weight) stops
    the run with a FloranaError naming the node.
    """

    def __init__(self, method: str = "florana", lora_config=None, *, uniform_weights: bool = False,
                 options: dict | None = None, **fedavg):
        super().__init__(**fedavg)
        m = get_method(method).configured(**(options or {}))
        if m.name in BASE_CHANGING:
            raise FloranaError(f"{m.name} is not available as a drop-in strategy: each client would have to "
                               f"{BASE_CHANGING[m.name]}, which a ClientApp that loads the global ArrayRecord does not "
                               f"do; use florana.aggregate and florana.client_helpers.apply_base_update in your "
                               f"ClientApp, or `florana run --runtime flower`")
        if lora_config is None:
            raise FloranaError("FloranaLoRA needs lora_config (the peft.LoraConfig the clients train with): it sets "
                               "the LoRA scaling of every module")
        self.method, self.uniform_weights = m, uniform_weights
        self.lora_config = _config_dict(lora_config, "FloranaLoRA")
        self.reports: dict[int, AggregateReport] = {}
        self.node_ranks: dict[int, int] = {}  # node id → the LoRA rank of its last reply

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> LoRA aggregation: %s (%s weights)", self.method.name,
            "uniform" if self.uniform_weights else f"'{self.weighted_by_key}'")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's messages, each node's global adapter at its own rank (`_at_node_ranks`)."""
        return self._at_node_ranks(super().configure_train(server_round, arrays, config, grid), arrays, config,
                                   MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._at_node_ranks(super().configure_evaluate(server_round, arrays, config, grid), arrays, config,
                                   MessageType.EVALUATE)

    def _at_node_ranks(self, messages: Iterable[Message], arrays: ArrayRecord, config: ConfigRecord,
                       kind: str) -> list[Message]:
        """A node whose last reply had a smaller LoRA rank than the global adapter gets the global adapter at its
        rank: the first r components, B rescaled to its lora_alpha/r (hetlora, flexlora, fedit, svd, florana
        accept mixed ranks). The others get FedAvg's message unchanged."""
        messages = list(messages)
        state, cut = None, {}
        for i, msg in enumerate(messages):
            r = self.node_ranks.get(msg.metadata.dst_node_id)
            if r is None:
                continue
            state = state if state is not None else _state_dict(arrays, "the global adapter")
            module, A = next((k[: -len(LORA_A)], t) for k, t in state.items() if k.endswith(LORA_A))
            if r >= A.shape[0]:
                continue
            if r not in cut:
                scaling = [module_scaling(self.lora_config, module, rank) for rank in (A.shape[0], r)]
                cut[r] = ArrayRecord({k: v.contiguous() for k, v in at_rank(state, r, scaling[0] / scaling[1]).items()})
            content = RecordDict({self.arrayrecord_key: cut[r], self.configrecord_key: config})
            messages[i] = Message(content=content, message_type=kind, dst_node_id=msg.metadata.dst_node_id)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies' LoRA adapters with the method, the rest with FedAvg's weights."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        adapters, labels, weights, received = [], [], [], 0
        for msg in valid:
            label = f"node {msg.metadata.src_node_id}"
            record = self._array_record(msg, label)
            state = _state_dict(record, label)
            received += sum(t.numel() * t.element_size() for t in state.values())
            adapters.append(_adapter_of(self.lora_config, state, label))
            ranks = {m.rank for m in adapters[-1].modules.values()}
            if len(ranks) == 1:
                self.node_ranks[msg.metadata.src_node_id] = ranks.pop()
            labels.append(label)
            weights.append(None if self.uniform_weights else self._weight(msg, label))
        state, report = _aggregate(adapters, self.method, None if self.uniform_weights else weights, labels,
                                   round_=server_round)
        self.reports[server_round] = report
        metrics = self._client_metrics([msg.content for msg in valid])
        metrics.update({"aggregation-error": report.relative_error, "aggregation-error-floor": report.error_floor,
                        "aggregation-fedit-error": report.fedit_error,
                        "aggregation-bytes-up": sum(report.bytes_up_per_client),
                        "aggregation-bytes-down": sum(report.bytes_down_per_client), "flower-bytes-up": received})
        return ArrayRecord({k: v.contiguous() for k, v in state.items()}), metrics

    def _array_record(self, msg: Message, label: str) -> ArrayRecord:
        records = msg.content.array_records
        if self.arrayrecord_key in records:
            return records[self.arrayrecord_key]
        if len(records) != 1:
            raise FloranaError(f"{label}: its reply holds {len(records)} ArrayRecords ({', '.join(records)}) and none "
                               f"named '{self.arrayrecord_key}'; send the PEFT state dict as one ArrayRecord")
        return next(iter(records.values()))

    def _weight(self, msg: Message, label: str) -> float:
        """The reply's `weighted_by_key` value, a finite number ≥ 0."""
        key = self.weighted_by_key
        found = [m[key] for m in msg.content.metric_records.values() if key in m]
        value = found[0] if found else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise FloranaError(f"{label}: its MetricRecord's '{key}' is {value!r}, not a number >= 0 (the client's "
                               f"weight; uniform_weights=True weighs every client alike)")
        return float(value)

    def _client_metrics(self, contents) -> MetricRecord:
        """FedAvg's average of the clients' metrics, where every reply has the weight key (uniform weights: the
        plain mean of metrics every reply has)."""
        if not self.uniform_weights:
            return self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        records = [next(iter(c.metric_records.values()), MetricRecord()) for c in contents]
        common = set.intersection(*(set(r.keys()) for r in records))
        return MetricRecord({k: sum(float(r[k]) for r in records) / len(records) for k in sorted(common)
                             if all(isinstance(r[k], (int, float)) for r in records)})


def _state_dict(record: ArrayRecord, label: str) -> dict[str, torch.Tensor]:
    """An ArrayRecord as torch tensors (copies); arrays that are not plain numeric ones name the node."""
    out = {}
    for key, array in record.items():
        try:
            a = array.numpy()
        except Exception as e:  # a malformed array from a node: name it, whatever NumPy said
            raise FloranaError(f"{label}: array {key} cannot be read ({e})") from None
        if a.dtype.kind not in "fiub":
            raise FloranaError(f"{label}: array {key} has dtype {a.dtype}, not a numeric one")
        out[key] = torch.from_numpy(np.array(a, copy=True))
    return out
