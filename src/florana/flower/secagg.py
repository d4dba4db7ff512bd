"""Secure aggregation on Flower: SecAgg+ (Bell et al., CCS 2020, https://eprint.iacr.org/2020/704) as Flower 1.42
implements it, for the methods whose server step needs only the clients' weighted mean (`Method.sum_shaped`).

No cryptography of ours. The node runs Flower's `secaggplus_mod` as it is (key pairs, Shamir shares of its secrets,
pairwise and private masks); `secagg_mod` hands it the messages that carry SecAgg+'s config record. The server runs
the four stages of Flower's `SecAggPlusWorkflow` (setup, share keys, collect masked vectors, unmask) from florana's
strategy; `_Legacy` is the little of Flower's legacy context and strategy those stages read: the round, the nodes
and the message each gets, and where the unmasked mean lands.

What a node adds to the sum (`contribution`): the tensors its method uploads this round, zero-padded to the global
rank with its scaling carried to the global one (B·s_u/s), as float arrays in `sum_keys` order, and its weight
(its example count, or 1 with uniform weighting; 0 for an update it rejected as non-finite). Flower's mod multiplies
the arrays by weight/max_weight, quantises them stochastically to integers in [0, T] over [-c, c] (T =
secagg_quantization, c = secagg_clip), masks them modulo 2^32, and puts the weight in the sum as well; the server
unmasks only the total and divides by the total weight: Σ_u w_u x_u / Σ_u w_u, which is fedit's, ffa's, fedsa's,
rolora's and fedsvd's input (their estimate of that one mean is their estimate of the clients).

Rounding: stochastic rounding moves each value by less than one step 2c/T, so each entry of the mean is within
(2c/T)·Σ_u 1 / Σ_u (w_u/w_max) of the exact weighted mean: 2c/T with uniform weights (1.9e-6 at the defaults),
at most U·2c/T with example weights (w_max: the round's largest count); plus float32 rounding of the result.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod.secure_aggregation.secaggplus_mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState
from torch import Tensor

from florana.errors import FloranaError
from florana.federation.engine import Federation, LocalResult
from florana.lora.adapter import padded_to_rank

log = logging.getLogger("florana")

MODULUS = 1 << 32  # Flower's default modulus_range: masks and sums live modulo 2^32
MASKED_BYTES = 8  # each masked value travels as an int64


# ---- both sides ---------------------------------------------------------------------------------------
def sum_keys(fed: Federation, round_: int) -> dict[str, Tensor]:
    """What every node adds to round `round_`'s secure sum, in this order, at the global rank: the tensors its
    method uploads that round (the shapes; both sides compute the same)."""
    return dict(sorted(fed.wire_keys(fed.initial, up=True, round_=round_).items()))


# ---- the node -----------------------------------------------------------------------------------------
def secagg_mod(msg: Message, context, call_next):
    """Flower's secaggplus_mod for the train messages of a SecAgg+ round (they carry its config record); every
    other message passes untouched."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def in_secure_round(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def contribution(fed: Federation, u: int, upload: dict[str, Tensor] | None, round_: int,
                 node: int) -> tuple[list[np.ndarray], int]:
    """Client u's arrays for the secure sum (`sum_keys` order, at the global rank, its B carried to the global
    scaling) and its weight; zeros of weight 0 for an update it rejected. A value outside ±secagg_clip is an error:
    Flower would clip it silently and the sum would be wrong."""
    like = sum_keys(fed, round_)
    if upload is None:
        return [np.zeros(tuple(t.shape), np.float32) for t in like.values()], 0
    m = fed.modules[0]  # a run's scaling rule is the same for every module
    padded = padded_to_rank(upload, fed.rank, fed.slots.scaling(m, fed.ranks[u]) / fed.slots.scaling(m, fed.rank))
    if set(padded) != set(like):
        raise FloranaError(f"node {node}: its upload has keys {sorted(set(padded) ^ set(like))[:3]} unlike the "
                           "round's secure sum")
    clip = fed.config.secagg_clip
    for key, t in padded.items():
        if (peak := t.abs().max().item()) > clip:
            raise FloranaError(f"node {node} (partition {u}): {key} holds a value of magnitude {peak:.3g}, outside "
                               f"secagg_clip={clip:g}, which SecAgg+ would clip silently; raise secagg_clip")
    weight = fed.data.clients[u].size if fed.config.weighting == "examples" else 1
    return [padded[k].detach().to("cpu", torch.float32).numpy() for k in like], weight


def masked_reply(fed: Federation, u: int, result: LocalResult, metrics: dict, round_: int, node: int) -> RecordDict:
    """The node's reply as Flower's secaggplus_mod reads it (a FitRes: the arrays and the weight, which it masks and
    then deletes from the reply), with the round's metrics as every reply carries them."""
    arrays, weight = contribution(fed, u, result.tensors, round_, node)
    content = fitres_to_recorddict(FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, {}), False)
    content["metrics"] = MetricRecord(metrics)
    return content


# ---- the server ---------------------------------------------------------------------------------------
class _Legacy:
    """What SecAggPlusWorkflow's stages read of Flower's LegacyContext (the round, the parameters record), of its
    client manager and of the legacy strategy (configure_fit: the nodes to sample; aggregate_fit: where the
    unmasked mean lands)."""

    def __init__(self, round_: int, nodes: list[int]):
        self.state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: round_}),
                                 MAIN_PARAMS_RECORD: ArrayRecord()})
        self.strategy = self.client_manager = self
        self.nodes, self.mean = nodes, None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(SimpleNamespace(node_id=n), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def num_available(self) -> int:
        return len(self.nodes)

    def aggregate_fit(self, server_round, results, failures):
        if results:  # the workflow hands every result the same parameters: the unmasked weighted mean
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


class _Recording:
    """The grid, keeping the replies that carry the nodes' masked vectors (and their metrics)."""

    def __init__(self, grid):
        self.grid, self.replies = grid, []

    def send_and_receive(self, messages, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies += [r for r in replies if not r.has_error() and Key.MASKED_PARAMETERS in
                         r.content.config_records.get(RECORD_KEY_CONFIGS, {})]
        return replies


class SecureRound:
    """One round's SecAgg+ on the server: `run` exchanges every message of the round; then `replies` are the
    nodes' (metrics, no tensors) and `mean` the weighted mean of what they added, by key, or None."""

    def __init__(self, fed: Federation, round_: int, timeout: float):
        self.fed, self.round_, self.timeout = fed, round_, timeout
        self.replies: list[Message] = []
        self.mean: dict[str, Tensor] | None = None

    def workflow(self, nodes: int, max_weight: float) -> SecAggPlusWorkflow:
        cfg = self.fed.config
        if nodes < 2:
            raise FloranaError(f"round {self.round_}: secure aggregation needs at least 2 nodes in a round (the sum "
                               f"of one is its update), {nodes} reachable")
        if nodes * cfg.secagg_quantization >= MODULUS:
            raise FloranaError(f"round {self.round_}: {nodes} nodes × secagg_quantization={cfg.secagg_quantization} "
                               "would overflow the modulus 2^32; lower secagg_quantization")
        shares = 1.0 if cfg.secagg_shares == 0 or cfg.secagg_shares >= nodes else cfg.secagg_shares
        return SecAggPlusWorkflow(shares, cfg.secagg_threshold, max_weight=max_weight, clipping_range=cfg.secagg_clip,
                                  quantization_range=cfg.secagg_quantization, modulus_range=MODULUS,
                                  timeout=self.timeout)

    def run(self, grid, messages: list[Message], partitions: dict[int, int]) -> None:
        """The four stages for these train messages (one per node; `partitions`: node → partition, for the
        weights' bound)."""
        fed = self.fed
        sizes = [fed.data.clients[partitions[m.metadata.dst_node_id]].size for m in messages]
        max_weight = float(max(sizes)) if fed.config.weighting == "examples" else 1.0
        workflow = self.workflow(len(messages), max_weight)
        legacy, state, recording = _Legacy(self.round_, [m.metadata.dst_node_id for m in messages]), \
            WorkflowState(), _Recording(grid)
        for stage in (workflow.setup_stage, workflow.share_keys_stage):
            if not stage(recording, legacy, state):
                self.stopped(stage.__name__, state)
        state.nid_to_fitins = {m.metadata.dst_node_id: m.content for m in messages}  # what each node trains from
        for stage in (workflow.collect_masked_vectors_stage, workflow.unmask_stage):
            if not stage(recording, legacy, state):
                self.stopped(stage.__name__, state)
        self.replies = recording.replies
        if legacy.mean is not None and any(sum_weight(r) > 0 for r in self.replies):
            like = sum_keys(fed, self.round_)
            if [tuple(t.shape) for t in like.values()] != [a.shape for a in legacy.mean]:
                raise FloranaError(f"round {self.round_}: the secure sum's arrays do not have the adapter's shapes")
            self.mean = {k: torch.from_numpy(np.asarray(a, dtype=np.float64)) for k, a in zip(like, legacy.mean)}

    def stopped(self, stage: str, state: WorkflowState) -> None:
        why = "; ".join(dict.fromkeys(str(e) for e in state.failures)) or "no node error reported"
        raise FloranaError(f"round {self.round_}: SecAgg+ stopped at its {stage.removesuffix('_stage')} stage: "
                           f"{len(state.active_node_ids)} node(s) still answering, fewer than a node's threshold "
                           f"{state.threshold} of {state.num_shares} shares ({why}); the run resumes after round "
                           f"{self.round_ - 1} with resume=true")


def sum_weight(reply: Message) -> int:
    """The weight a node put in the secure sum (0: it rejected its own update)."""
    return int(reply.content.metric_records["fitres.num_examples"]["num_examples"])


def upload_bytes(fed: Federation, round_: int) -> int:
    """Bytes of the masked vector each node sends in round `round_`: its values and its weight, each an int64 (.npy
    headers not counted, as the ledger counts none)."""
    return MASKED_BYTES * (1 + sum(t.numel() for t in sum_keys(fed, round_).values()))
