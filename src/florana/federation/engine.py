"""The in-process federation: one base model in memory, clients that own only adapter tensors.

Data flows one way: config → data and partition → clients train → aggregator → new global adapter →
evaluation and ledger → checkpoint. Every random choice derives from (seed, round, client), so a resumed
run replays exactly what an uninterrupted one would have done.

Devices (train/device.py): the model, its adapter slots and base delta, every batch and the evaluation live on the
run's device; the server's state (global adapter, clients' personal parts, residuals, uploads) and everything that
is checkpointed or sent lives on the CPU, so GPU memory does not grow with the number of clients. Aggregation runs
on the run's device, a batch of modules at a time.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from florana.aggregation import aggregate_adapters
from florana.config import RunConfig, describe, load_config
from florana.data import Examples, load_examples, partition, partition_stats, relabel
from florana.errors import FloranaError
from florana.federation.checkpoint import (latest_checkpoint, latest_round, prune_checkpoints, save_checkpoint,
                                           write_text_atomic)
from florana.federation.folders import check_run_folder, holding
from florana.federation.methods import method_of, run_differences
from florana.lora.adapter import LoraModule, at_rank, has_non_finite, revive_dead_slots
from florana.lora.base_delta import apply_change, factor_change, total_change
from florana.lora.peft_io import save_adapter
from florana.privacy import PrivacyPlan, clip_update, dp_fedavg, dp_seed, poisson_batches
from florana.privacy.accountant import FEDERATION, client_level_plan, sample_level_plan
from florana.report.provenance import record_session
from florana.train.device import on_cpu, peak_memory_mib, precision_for, reset_peak_memory, resolve_device
from florana.train.local import batch_indices, private_train_steps, train_steps
from florana.train.model import AdapterSlots, load_model, quantization_config
from florana.train.sandbox import Limits
from florana.train.tasks import CausalLMTask, ClassificationTask, CodeTask, Encoded

log = logging.getLogger("florana")


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the allocator is someone else's business
        return None


_LIBC = _glibc()


def release_memory() -> None:
    """Hand freed heap pages back to the OS after a client or an aggregation: each client's padded batches
    take new shapes, and without this glibc's arenas keep growing with the number of clients."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class BudgetSpent(FloranaError):
    """The next round would take a client past the run's target ε (dp_epsilon with dp_noise)."""


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def lora_settings(config: RunConfig) -> dict:
    """The LoraConfig fields of a run's model: its LoRA has the largest client rank (the global rank)."""
    return {"r": max(config.ranks()), "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "use_rslora": config.rslora, "target_modules": list(config.target_modules)}


@dataclass
class Client:
    """One client's data: its training part and the held-out part its local model is scored on."""

    train: Encoded
    test: Encoded
    size: int


def usable(loss: float, tensors: dict[str, Tensor]) -> bool:
    """An update may be aggregated only if its loss and every factor are finite."""
    return math.isfinite(loss) and not any(has_non_finite(t) for t in tensors.values())


def tensor_bytes(tensors: dict[str, Tensor] | None) -> int:
    """Bytes of tensor data in a payload (what the ledger books)."""
    return sum(t.numel() * t.element_size() for t in (tensors or {}).values())


@dataclass
class LocalResult:
    """What a client hands back after training: the adapter tensors its method uploads (None when rejected as
    non-finite), its mean loss, its local model's accuracy on its own held-out part, its example count (the
    FedAvg weight), the bytes its upload took on the wire, and what answering its own training data's majority
    class scores on that held-out part (the floor its local accuracy is read against on a label-skewed split)."""

    loss: float
    tensors: dict[str, Tensor] | None
    local_accuracy: float | None
    size: int
    upload_bytes: int = 0
    local_majority: float | None = None


@dataclass
class Data:
    test: Encoded | None  # None: the run has no global test set (node-local data without server_test_data)
    clients: list[Client]
    stats: list[dict]
    label_names: list[str]


def make_task(config: RunConfig, tokenizer, num_labels: int, precision):
    """The task object that encodes, batches and scores examples for config.task, under `precision`'s autocast."""
    if config.task == "classification":
        return ClassificationTask(tokenizer, config.max_length, num_labels, precision)
    if config.task == "code":
        limits = Limits(timeout_s=config.code_timeout, memory_mib=config.code_memory_mib)
        return CodeTask(tokenizer, config.max_length, precision, config.max_new_tokens, limits, config.threads)
    return CausalLMTask(tokenizer, config.max_length, precision, config.max_new_tokens)


def eval_subset(test: Encoded, limit: int, seed: int) -> Encoded:
    """The part of the global test set scored every round: `limit` examples fixed by the seed (0: all of it)."""
    if not limit or limit >= len(test):
        return test
    keep = np.sort(np.random.default_rng(derive_seed(seed, 8)).permutation(len(test))[:limit])
    return test.subset(keep.tolist())


def split_data(examples: Examples, config: RunConfig) -> tuple[Examples, list[Examples], list[Examples], list[dict]]:
    """Global test set, then each client's train and held-out parts; all fixed by the seed."""
    n = len(examples)
    if config.test_size >= n:
        raise FloranaError(f"test_size={config.test_size} leaves no training data ({n} examples)")
    order = np.random.default_rng(derive_seed(config.seed, 1)).permutation(n)
    test, pool = examples.subset(order[: config.test_size]), examples.subset(order[config.test_size:])
    parts = partition(pool.labels, config.num_clients, config.partition, alpha=config.alpha,
                      shards_per_client=config.shards_per_client, seed=derive_seed(config.seed, 2))
    trains, tests = [], []
    for u, idx in enumerate(parts):
        idx = np.random.default_rng(derive_seed(config.seed, 3, u)).permutation(idx)
        n_test = int(round(config.client_test_fraction * len(idx))) if len(idx) > 1 else 0
        trains.append(pool.subset(idx[n_test:]))
        tests.append(pool.subset(idx[:n_test][: config.client_test_max]))
    return test, trains, tests, partition_stats(pool.labels, parts, pool.label_names)


@dataclass
class Split:
    """A run's examples before encoding: the global test set (None: none), each client's train and held-out parts,
    the partition's statistics and the label names (the classification head's order)."""

    test: Examples | None
    trains: list[Examples]
    tests: list[Examples]
    stats: list[dict]
    label_names: list[str]


def load_test(config: RunConfig, label_names: list[str]) -> Examples:
    """The server's own test file (server_test_data), in the run's label order."""
    test = load_examples(config.server_test_data, text_column=config.text_column, label_column=config.label_column,
                         causal=config.task == "causal_lm", code=config.task == "code", seed=config.seed)
    return relabel(test, label_names, config.server_test_data) if config.task == "classification" else test


def load_split(config: RunConfig) -> Split:
    """The dataset named by the config, split into the global test set and the clients' parts (labels in the order
    `labels` gives, if it gives one); the global test set is server_test_data where the config names one."""
    examples = load_examples(config.dataset, text_column=config.text_column, label_column=config.label_column,
                             causal=config.task == "causal_lm", code=config.task == "code",
                             max_examples=config.max_examples, seed=config.seed)
    if config.labels and config.task == "classification":
        examples = relabel(examples, config.labels, config.dataset)
    test, trains, tests, stats = split_data(examples, config)
    if config.server_test_data:
        test = load_test(config, examples.label_names)
    return Split(test, trains, tests, stats, examples.label_names)


def privacy_plan(config: RunConfig, sizes: list[int]) -> PrivacyPlan | None:
    """The run's DP (None without): the noise multiplier given or calibrated for the planned rounds, each accounted
    unit's sample rate and δ. `sizes`: each client's training examples."""
    common = dict(clip=config.dp_clip, noise=config.dp_noise or None, target=config.dp_epsilon or None,
                  delta=config.dp_delta or None, rounds=config.rounds)
    if config.dp == "sample":
        return sample_level_plan(**common, batch_size=config.batch_size, local_steps=config.local_steps,
                                 sizes={u: n for u, n in enumerate(sizes) if n > 0})
    if config.dp == "client":
        return client_level_plan(**common, sample_fraction=config.sample_fraction, num_clients=config.num_clients)
    return None


class Federation:
    """The live state of a run: model, data, the global adapter, per-client state, and the ledger."""

    def __init__(self, config: RunConfig, progress=None, split: Split | None = None, secret_dp: bool = False):
        torch.set_num_threads(config.threads)
        self.config, self.progress = config, progress
        self.secret_dp = secret_dp  # DP's batches and noise from OS entropy (a deployment), not the run's seed
        self.device = resolve_device(config.device)  # before anything loads: a missing GPU fails at once
        self.precision = precision_for(self.device, config.bf16)
        self.method = method_of(config)
        # a run that cannot quantize stops before loading data; load_model places a quantized base itself
        quantization_config(config.quantization, config.dtype, self.device)
        split = split or load_split(config)  # a Flower node or server with node-local data brings its own
        names = split.label_names
        self.ranks = config.ranks()  # each client's LoRA rank; the model's LoRA has the largest, the global rank
        self.rank = max(self.ranks)
        self.model, tokenizer = load_model(config.task, config.model, len(names), lora_settings(config),
                                           config.seed, dtype=config.dtype, quantization=config.quantization,
                                           gradient_checkpointing=config.gradient_checkpointing, device=self.device)
        self.task = make_task(config, tokenizer, len(names), self.precision)
        encode = lambda x: self.task.encode(x) if len(x) else Encoded([], [])  # noqa: E731 (a slot with no data here)
        self.data = Data(None if split.test is None else encode(split.test),
                         [Client(encode(tr), encode(te), len(tr)) for tr, te in zip(split.trains, split.tests)],
                         split.stats, names)
        self.eval_test = None if self.data.test is None else \
            eval_subset(self.data.test, config.eval_max_examples, config.seed)
        self.privacy = privacy_plan(config, [c.size for c in self.data.clients])
        self.checkpoint_noise: dict[int, float] = {}  # a resumed run's σ_u, for units that join later
        self.slots = AdapterSlots.of(self.model)
        self.initial = on_cpu(self.slots.read())
        self.modules = sorted({k.rsplit(".lora_", 1)[0] for k in self.initial if ".lora_" in k})
        self.params = self.slots.trainable()  # what a bound trains; a method's clients train what its round says
        if self.privacy is not None and self.privacy.noise:
            self.log_privacy()
        # state that a checkpoint carries
        self.global_tensors = dict(self.initial)
        self.personal: dict[int, dict[str, Tensor]] = {}
        self.ledger = {"bytes_up": 0, "bytes_down": 0}
        self.base_round = 0  # the last round that changed the base delta (slots.base_delta)
        self.last_change: dict[str, Tensor] = {}  # that round's change, as sent to clients
        self.synced: dict[int, int] = {}  # client → the base_round its base delta is at (0 when absent)
        self.held: dict[int, int] = {}  # client → the round it last downloaded global factors at (0: the initial)
        self.changed: dict[str, int] = {}  # factor ('A', 'B') → the last round that changed its global value
        # error feedback: the residual carried into the next round's target, per module (None: off)
        self.feedback: dict[str, LoraModule] | None = {} if config.error_feedback else None
        self.history: list[dict] = []
        self.spent: dict[int, int] = {}  # DP: rounds charged to each accounted unit (a client, or FEDERATION)
        self.gpu_peak: float | None = None  # the open round's peak GPU memory so far (MiB; None on the CPU)

    @property
    def changes_base(self) -> bool:
        """The run's method changes the base weights (flora, fedex): clients then need the base delta."""
        return self.method is not None and self.method.changes_base

    # ---- state <-> checkpoint -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"global::{k}": v for k, v in self.global_tensors.items()}
        out.update({f"base_delta::{m}": d for m, d in self.slots.base_delta.items()})
        out.update({f"last_change::{k}": v for k, v in self.last_change.items()})
        for u, tensors in self.personal.items():
            out.update({f"personal::{u}::{k}": v for k, v in tensors.items()})
        for m, r in (self.feedback or {}).items():
            out.update({f"feedback::{m}::A": r.A, f"feedback::{m}::B": r.B})
        return on_cpu(out)

    def state_meta(self) -> dict:
        return {"ledger": self.ledger, "history": self.history, "base_round": self.base_round,
                "synced": {str(u): r for u, r in self.synced.items()},
                "held": {str(u): r for u, r in self.held.items()}, "changed": self.changed,
                "privacy": None if self.privacy is None else
                {"noise": {str(u): n for u, n in self.privacy.noise.items()},
                 "spent": {str(u): n for u, n in self.spent.items()}}}

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        self.global_tensors = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("global::")}
        self.personal, self.last_change, delta, feedback = {}, {}, {}, {}
        for key, v in tensors.items():
            kind, _, rest = key.partition("::")
            if kind == "base_delta":
                delta[rest] = v
            elif kind == "last_change":
                self.last_change[rest] = v
            elif kind == "personal":
                u, _, k = rest.partition("::")
                self.personal.setdefault(int(u), {})[k] = v
            elif kind == "feedback":
                m, _, factor = rest.rpartition("::")
                feedback.setdefault(m, {})[factor] = v
            elif kind == "base":  # written before base deltas existed: the adapted base weight itself
                delta[rest] = v.float() - self.slots.base_weight(rest).float().cpu()
        self.slots.set_base_delta(delta)
        self.ledger, self.history = meta["ledger"], meta["history"]
        self.base_round = meta.get("base_round", len(self.history) if delta else 0)
        self.synced = {int(u): r for u, r in meta.get("synced", {}).items()}
        self.held = {int(u): r for u, r in meta.get("held", {}).items()}
        self.changed = dict(meta.get("changed", {}))
        if self.privacy is not None:
            stored = meta.get("privacy") or {}
            noise = stored.get("noise")
            if not isinstance(noise, dict):  # written before each client had its own σ
                raise FloranaError(f"checkpoint's DP noise multiplier {noise} is one for every client; this version "
                                   f"plans each client's own: its accounting cannot continue (start the run afresh)")
            self.checkpoint_noise = {int(u): n for u, n in noise.items()}  # checked as each round opens, when
            # the nodes with their own data have joined the plan
            self.spent = {int(u): n for u, n in stored["spent"].items()}
        if self.feedback is not None:
            self.feedback = {m: LoraModule(A=f["A"], B=f["B"]) for m, f in feedback.items()}

    # ---- one round ------------------------------------------------------------------------------------
    def sample(self, round_: int) -> tuple[list[int], list[int]]:
        """Clients with training data, a seeded fraction of them; and the ones skipped for having none."""
        empty = [u for u, c in enumerate(self.data.clients) if c.size == 0]  # a remote node's data: its count
        eligible = [u for u in range(len(self.data.clients)) if u not in empty]
        if not eligible:
            raise FloranaError("no client has training data")
        rng = np.random.default_rng(derive_seed(self.config.seed, 4, round_))
        if self.config.dp == "client":  # Poisson sampling, as the accountant's amplification assumes (maybe nobody)
            return [u for u, x in zip(eligible, rng.random(len(eligible))) if x < self.config.sample_fraction], empty
        k = max(1, int(round(self.config.sample_fraction * len(eligible))))
        return sorted(rng.choice(eligible, size=k, replace=False).tolist()), empty

    def for_client(self, tensors: dict[str, Tensor], u: int) -> dict[str, Tensor]:
        """Client u's view of adapter tensors held at the global rank: their first r_u components, B carried from
        the global scaling s to the client's s_u so that the product is kept (s_u·B_u·A_u = s·B̂[:, :r_u]Â[:r_u]);
        every other tensor as it is. The tensors themselves for a client of the global rank. Every method's download
        is this view of the global factors (flexlora's are ΔW*'s SVD, so a client gets its top r_u components)."""
        r = self.ranks[u]
        if r == self.rank:
            return tensors
        m = self.modules[0]  # a run's scaling rule is the same for every module
        return at_rank(tensors, r, self.slots.scaling(m, self.rank) / self.slots.scaling(m, r))

    def client_start(self, u: int, round_: int, shared: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """What client u's adapter holds before local training, by its method's semantics, at its own rank.
        `shared` is what the server sent it (the global part of `downlink`); by default this process's server
        state, as the in-process run has it."""
        if self.config.method == "local":
            start = dict(self.personal.get(u, self.for_client(self.initial, u)))
        else:
            if shared is None:
                shared = self.for_client(self.global_tensors, u)
                shared = shared if self.method is None else self.wire_keys(shared, up=False)
            start = {**self.for_client(self.initial, u), **shared}
        if self.method is not None and self.method.personal_B and u in self.personal:
            start.update(self.personal[u])
        if self.method is not None and self.method.merges:  # flora: a fresh LoRA every round
            g = torch.Generator().manual_seed(derive_seed(self.config.seed, 5, round_, u))
            for k, v in start.items():
                if ".lora_A." in k:
                    a = torch.empty_like(v)
                    bound = 1.0 / math.sqrt(v.shape[1])  # PEFT's kaiming_uniform(a=sqrt(5)) bound
                    start[k] = a.uniform_(-bound, bound, generator=g)
                elif ".lora_B." in k:
                    start[k] = torch.zeros_like(v)
        elif self.method is not None and self.method.at_round(round_).trains_A:  # never a frozen, shared A
            revive_dead_slots(start, derive_seed(self.config.seed, 7, round_, u))
        return start

    def wire_keys(self, tensors: dict[str, Tensor], *, up: bool, round_: int | None = None) -> dict[str, Tensor]:
        """The part of an adapter's tensors that its method sends up (client → server) or down in round `round_`
        (None: in some round): LoRA factors as the method says, every other trainable tensor (a classification
        head) both ways."""
        method = self.method if round_ is None else self.method.at_round(round_)

        def travels(key: str) -> bool:
            factor = factor_of(key)
            return factor is None or method.sends(factor, up=up)
        return {k: v for k, v in tensors.items() if travels(k)}

    def global_down(self, u: int, round_: int) -> dict[str, Tensor]:
        """The global tensors client u receives as round `round_` starts: what its method sends this round and, for
        a method whose payload changes by round (rolora, fedsvd), every other factor that changed since the client
        last downloaded (it missed a round). Other methods send every factor they share each round anyway."""
        have = self.held.get(u, 0)  # it holds the global factors as they were when round `have` started

        def needed(key: str) -> bool:
            factor = factor_of(key)
            return factor is not None and self.changed.get(factor, -1) >= have
        sent = self.wire_keys(self.global_tensors, up=False, round_=round_)
        catch_up = {k: v for k, v in self.wire_keys(self.global_tensors, up=False).items() if needed(k)}
        return {**sent, **catch_up}

    def downlink(self, u: int, metrics: dict) -> dict[str, Tensor]:
        """What the server sends client u as a round starts, booked in `metrics`: the global tensors its method
        shares (global_down) at its own rank (for_client) and, where the method changes the base, what the client
        lacks of it (the last round's change, or the whole delta after it missed more than one)."""
        shared = self.for_client(self.global_down(u, metrics["round"]), u)
        payload = {f"global::{k}": v for k, v in shared.items()}
        self.held[u] = metrics["round"]
        if self.changes_base:
            have = self.synced.get(u, 0)
            change = {} if have == self.base_round else self.last_change if have == self.base_round - 1 else \
                total_change(self.slots.base_delta)
            payload.update({f"base::{k}": v for k, v in change.items()})
            self.synced[u] = self.base_round
        metrics["bytes_down"] += tensor_bytes(payload)
        return payload

    def log_privacy(self) -> None:
        """The plan's noise multipliers and, under DP-SGD, how much of a step is noise (PrivacyPlan.noise_to_clip)
        for what round 1 trains: a user whose steps are mostly noise learns why nothing moves."""
        sigmas = sorted(self.privacy.noise.values())
        log.info("dp=%s: noise multiplier %s, clip %g", self.config.dp, f"{sigmas[0]:.4f}" if sigmas[0] == sigmas[-1]
                 else f"{sigmas[0]:.4f}..{sigmas[-1]:.4f} (each client's own, for dp_epsilon = "
                 f"{self.config.dp_epsilon:g})", self.config.dp_clip)
        if self.privacy.mode != "sample":
            return
        method = None if self.method is None else self.method.at_round(1)
        trained = self.slots.trained_values() if method is None else \
            self.slots.trained_values(train_A=method.trains_A, train_B=method.trains_B)
        ratios = sorted(self.privacy.noise_to_clip(u, self.data.clients[u].size, trained) for u in self.privacy.noise)
        log.info("dp=sample: each step's noise on the mean gradient has norm ≈ %.2g..%.2g × dp_clip, against at "
                 "most 1 × dp_clip of clipped gradient (%d trained values, expected batch batch_size or a client's "
                 "whole data)%s", ratios[0], ratios[-1], trained,
                 "; steps that are mostly noise learn slowly or not at all: a larger batch_size lowers it"
                 if ratios[0] > 1 else "")

    def check_noise(self) -> None:
        """A resumed run's units must keep the noise multipliers their accounting so far assumed."""
        for u, sigma in self.privacy.noise.items():
            if u in self.checkpoint_noise and self.checkpoint_noise[u] != sigma:
                raise FloranaError(f"checkpoint's DP noise multiplier {self.checkpoint_noise[u]} for "
                                   f"{'the federation' if u == FEDERATION else f'client {u}'} differs from this "
                                   f"run's {sigma}: its accounting cannot continue")

    def join_private(self, u: int, count: int) -> None:
        """Plan sample-level DP for client u from the training examples its node reports (a node with its own
        data, which the server never loads): its σ_u, q_u and δ_u are what the node plans for itself."""
        if self.privacy is None or self.privacy.mode != "sample":
            return
        joining = privacy_plan(self.config, [count if v == u else 0 for v in range(len(self.data.clients))])
        self.privacy = self.privacy.joined(joining)

    def train_client(self, start: dict[str, Tensor], data: Encoded, steps: int, seed: int,
                     dp_client: int | None = None) -> tuple[float, dict]:
        """Train the model's adapter from `start`; the mean loss and the trained adapter (on the CPU). With
        `dp_client`, by DP-SGD as the run's plan has it for that client: Poisson batches of its sample rate, noise of
        its multiplier."""
        self.note_gpu_peak(reset=True)  # each client starts from an empty cache; the round keeps the largest peak
        self.slots.write(start)
        torch.manual_seed(seed)  # every device's generator: dropout draws the same on every run
        cfg, make_batch = self.config, (lambda idx: self.task.batch(data, idx))
        on_step = self.progress.step if self.progress else None
        if dp_client is None:
            batches = batch_indices(len(data), cfg.batch_size, steps, np.random.default_rng(seed))
            loss = train_steps(self.model, self.params, make_batch, batches, lr=cfg.lr,
                               weight_decay=cfg.weight_decay, precision=self.precision, on_step=on_step)
        else:
            seed, rate = dp_seed(seed, self.secret_dp), self.privacy.rates[dp_client]
            batches = poisson_batches(len(data), rate, steps, np.random.default_rng(seed))
            loss = private_train_steps(self.model, self.params, make_batch, batches, lr=cfg.lr,
                                       weight_decay=cfg.weight_decay, precision=self.precision, clip=cfg.dp_clip,
                                       noise=self.privacy.noise[dp_client], expected_batch=rate * len(data),
                                       generator=torch.Generator().manual_seed(derive_seed(seed, 10)),
                                       on_step=on_step)
        release_memory()
        return loss, on_cpu(self.slots.read())

    def note_gpu_peak(self, *, reset: bool = False) -> None:
        """Fold the GPU's peak memory since the last reset into the open round's (a no-op on the CPU); with
        `reset`, empty the allocator's cache and restart the peak counter."""
        peak = peak_memory_mib(self.device)
        if peak is not None:
            self.gpu_peak = max(self.gpu_peak or 0.0, peak)
        if reset:
            reset_peak_memory(self.device)

    def evaluate(self, tensors: dict[str, Tensor], data: Encoded) -> dict:
        self.slots.write(tensors)
        return self.task.evaluate(self.model, data, self.config.eval_batch_size)

    def local_update(self, u: int, start: dict[str, Tensor], round_: int) -> tuple[LocalResult, dict[str, Tensor]]:
        """Client u's part of a round, wherever it runs (this process or a Flower node): train from `start`,
        refuse a non-finite result, score the local model on the client's held-out part. Returns what it sends
        the server and what it keeps to itself."""
        client = self.data.clients[u]
        if self.method is not None:  # what trains this round (ffa: B; rolora: B or A; fedsvd: B), and the head
            method = self.method.at_round(round_)
            self.params = self.slots.trainable(train_A=method.trains_A, train_B=method.trains_B)
        private = self.privacy is not None and self.privacy.mode == "sample"
        loss, tensors = self.train_client(start, client.train, self.config.local_steps,
                                          derive_seed(self.config.seed, 6, round_, u),
                                          dp_client=u if private else None)
        if not usable(loss, tensors):
            return LocalResult(loss, None, None, client.size), {}
        accuracy = self.task.evaluate(self.model, client.test, self.config.eval_batch_size)["accuracy"]
        floor = self.task.majority_accuracy(client.train, client.test)
        if self.method is None:  # a bound: nothing crosses a wire
            return LocalResult(loss, tensors, accuracy, client.size, local_majority=floor), self.personal_part(tensors)
        upload = self.wire_keys(tensors, up=True, round_=round_)
        if self.privacy is not None and self.privacy.mode == "client":  # what it sends moves at most dp_clip
            delta = clip_update({k: v - start[k] for k, v in upload.items()}, self.config.dp_clip)
            upload = {k: start[k] + d for k, d in delta.items()}
        return LocalResult(loss, upload, accuracy, client.size, tensor_bytes(upload), floor), \
            self.personal_part(tensors)

    def personal_part(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """What a client keeps to itself between rounds: everything for local, B for fedsa, nothing otherwise."""
        if self.config.method == "local":
            return tensors
        if self.method is not None and self.method.personal_B:
            return {k: v for k, v in tensors.items() if ".lora_B." in k}
        return {}

    def round(self, round_: int) -> dict:
        """One round in this process: every sampled client trains in turn, then the server closes the round."""
        return self.close_round(*self.train_round(round_))

    def train_round(self, round_: int) -> tuple[dict, dict[int, LocalResult], float]:
        """A round in this process up to the server's part: the open round's metrics, each sampled client's result
        (a bound has trained the global tensors instead) and when the round began, as close_round takes them."""
        cfg, t0 = self.config, time.perf_counter()
        sampled, empty = self.sample(round_)
        if self.progress:
            self.progress.start_round(round_, cfg.local_steps * len(sampled))
        metrics = self.open_round(round_, sampled, empty)
        results: dict[int, LocalResult] = {}
        if cfg.method == "centralized":
            pooled = Encoded.concat([self.data.clients[u].train for u in sampled])
            loss, self.global_tensors = self.train_client(self.global_tensors, pooled, cfg.local_steps * len(sampled),
                                                          derive_seed(cfg.seed, 6, round_))
            metrics["train_loss"] = loss
        else:
            for u in sampled:
                shared = None
                if self.method is not None:  # the client starts from what was sent, as a Flower node does
                    sent = self.downlink(u, metrics)
                    shared = {k.split("::", 1)[1]: v for k, v in sent.items() if k.startswith("global::")}
                    if self.method.varies:  # rolora, fedsvd: the factors a payload leaves out are those the client
                        # holds, unchanged since it last downloaded (global_down's catch-up), as a Flower node keeps
                        shared = {**self.wire_keys(self.for_client(self.global_tensors, u), up=False), **shared}
                results[u], kept = self.local_update(u, self.client_start(u, round_, shared), round_)
                if kept:
                    self.personal[u] = kept
        return metrics, results, t0

    def open_round(self, round_: int, sampled: list[int], empty: list[int]) -> dict:
        """A round's metrics record as it starts: who was sampled, who had no data. Under a DP budget, BudgetSpent
        if the round would take a sampled client past it (nothing has trained yet)."""
        if self.privacy is not None:
            self.check_noise()
            units = sampled if self.privacy.mode == "sample" else [FEDERATION]
            if (over := self.privacy.over_budget(units, self.spent)) is not None:
                who = "the federation" if over[0] == FEDERATION else f"client {over[0]}"
                raise BudgetSpent(f"stopped before round {round_}: it would take {who} to ε = {over[1]:.3f} > "
                                  f"dp_epsilon = {self.privacy.target:g} (noise multiplier "
                                  f"{self.privacy.noise[over[0]]:.4f}); "
                                  f"rounds 1..{round_ - 1} are complete")
        self.gpu_peak = None
        reset_peak_memory(self.device)
        return {"round": round_, "method": self.config.method, "seed": self.config.seed, "alpha": self.config.alpha,
                "clients": sampled, "skipped_empty": empty, "missing": [], "rejected": [], "bytes_up": 0,
                "bytes_down": 0}

    def close_round(self, metrics: dict, results: dict[int, LocalResult], t0: float,
                    summed: dict[str, Tensor] | None = None) -> dict:
        """The server's part of a round, given the clients' results in client order: reject bad updates,
        aggregate, evaluate the global model, book the bytes. `summed`: under secure aggregation, the weighted mean
        of the accepted clients' uploads at the global rank (all the server sees; their results carry no tensors);
        a sum-shaped method's aggregate is its aggregate of that one mean."""
        cfg, round_ = self.config, metrics["round"]
        updates, labels, weights, losses, local_acc, floors = [], [], [], [], {}, {}
        for u, res in sorted(results.items()):
            metrics["bytes_up"] += res.upload_bytes  # it crossed the wire, accepted or not
            if res.tensors is None or not usable(res.loss, res.tensors):  # a remote client's word is not enough
                log.warning("round %d: client %d's update rejected (loss %s or non-finite factors)",
                            round_, u, res.loss)
                metrics["rejected"].append(u)
                continue
            losses.append(res.loss)
            local_acc[u], floors[u] = res.local_accuracy, res.local_majority
            if self.method is not None and summed is None:  # what the server lacks of an adapter, it knows: the global factor clients
                # held frozen (ffa's and fedsvd's A, rolora's factor of the round), fedsa's initial B, at r_u
                updates.append(self.slots.adapter({**self.for_client(self.global_tensors, u), **res.tensors},
                                                  source=f"client{u}"))
                labels.append(f"client{u}")
                weights.append(res.size)
        if summed is not None and losses:  # the global factors the clients hold frozen, as above
            mean = self.slots.adapter({**self.global_tensors, **summed}, source="the secure sum")
            self.aggregate([mean], ["the secure sum"], [1], metrics, measured=False)
        elif self.privacy is not None and self.privacy.mode == "client":  # noised even when every update failed
            self.aggregate([self.private_sum(results, round_)], ["dp-fedavg"], [1.0], metrics)
        elif updates:
            self.aggregate(updates, labels, weights, metrics)
        elif self.method is not None:
            log.warning("round %d: every update was rejected; the global model is unchanged", round_)
        metrics.setdefault("train_loss", float(np.mean(losses)) if losses else None)  # centralized sets its own
        metrics["local_accuracy"] = {str(u): a for u, a in local_acc.items()}
        valid = [a for a in local_acc.values() if a is not None]
        metrics["local_accuracy_mean"] = float(np.mean(valid)) if valid else None
        scored = [floors[u] for u, a in local_acc.items() if a is not None]  # the floor of the same clients, or none
        metrics["local_majority"] = {str(u): f for u, f in floors.items()}
        metrics["local_majority_mean"] = float(np.mean(scored)) if scored and None not in scored else None
        if cfg.method == "local":
            final = round_ == cfg.rounds
            scores = [self.evaluate(t, self.data.test) for t in self.personal.values()] if final else []
            glob = {k: float(np.mean([s[k] for s in scores])) if scores and scores[0][k] is not None else None
                    for k in ("accuracy", "macro_f1", "loss")}
        elif self.method is not None and self.method.personal_B:  # B never leaves a client: no global model
            glob = {"accuracy": None, "macro_f1": None, "loss": None}
        elif self.data.test is None:  # node-local data and no server_test_data: the nodes score it (Flower)
            glob = {"accuracy": None, "macro_f1": None, "loss": None}
            metrics["global_test"] = "none"
        else:
            glob = self.evaluate(self.global_tensors, self.eval_test)
            self.book_generation(glob, metrics, len(self.eval_test))
        metrics.update({f"global_{k}": v for k, v in glob.items()})
        if round_ == cfg.rounds and self.eval_test is not self.data.test and glob["accuracy"] is not None \
                and cfg.method != "local":  # rounds scored a subset: the last also scores the whole test set, apart
            full = self.evaluate(self.global_tensors, self.data.test)
            self.book_generation(full, metrics, len(self.data.test), "final_")
            metrics.update({f"final_global_{k}": v for k, v in full.items()})
        gap_ok = metrics["local_accuracy_mean"] is not None and metrics["global_accuracy"] is not None
        metrics["local_global_gap"] = metrics["local_accuracy_mean"] - metrics["global_accuracy"] if gap_ok else None
        metrics.setdefault("relative_error", None)
        metrics.setdefault("error_floor", None)
        if self.privacy is not None:
            self.charge_privacy(metrics)
        self.ledger["bytes_up"] += metrics["bytes_up"]
        self.ledger["bytes_down"] += metrics["bytes_down"]
        metrics["cum_bytes_up"], metrics["cum_bytes_down"] = self.ledger["bytes_up"], self.ledger["bytes_down"]
        metrics["seconds"] = time.perf_counter() - t0
        self.note_gpu_peak()
        if self.gpu_peak is not None:  # CUDA only: metrics.jsonl on the CPU is as it always was
            metrics["gpu_peak_mib"] = round(self.gpu_peak, 1)
        return metrics

    def private_sum(self, results: dict[int, LocalResult], round_: int):
        """Client-level DP's server step as one adapter for the aggregator: the global tensors sent plus the noisy
        sum of the accepted clients' clipped updates over a fixed denominator, the expected number of clients per
        round (sample_fraction × clients with data), so that no client's presence moves the denominator."""
        received = self.wire_keys(self.global_tensors, up=True, round_=round_)
        uploads = [r.tensors for r in results.values() if r.tensors is not None and usable(r.loss, r.tensors)]
        eligible = sum(1 for c in self.data.clients if c.size > 0)  # as sample() counts: a remote node reports it
        noisy = dp_fedavg(received, uploads, clip=self.config.dp_clip, noise=self.privacy.noise[FEDERATION],
                          denominator=self.config.sample_fraction * eligible,
                          generator=torch.Generator().manual_seed(dp_seed(derive_seed(self.config.seed, 9, round_),
                                                                  self.secret_dp)))
        return self.slots.adapter({**self.global_tensors, **noisy}, source="dp-fedavg")

    def charge_privacy(self, metrics: dict) -> None:
        """Charge the round to who took part (sample: each sampled client; client: the federation, every round) and
        record each client's ε at its δ, their largest, and the noise multipliers (sample: each client's)."""
        plan = self.privacy
        for u in (metrics["clients"] if plan.mode == "sample" else [FEDERATION]):
            self.spent[u] = self.spent.get(u, 0) + 1
        if plan.mode == "sample":
            eps = {str(u): plan.epsilon(u, self.spent.get(u, 0)) for u in plan.rates}
        else:
            shared = plan.epsilon(FEDERATION, self.spent[FEDERATION])
            eps = {str(u): shared for u, c in enumerate(self.data.clients) if c.size > 0}
        sample = plan.mode == "sample"
        metrics.update(dp_epsilon=eps, dp_epsilon_max=max(eps.values(), default=0.0),
                       dp_noise={str(u): n for u, n in plan.noise.items()} if sample else plan.noise[FEDERATION],
                       dp_delta={str(u): d for u, d in plan.deltas.items()} if sample else plan.deltas[FEDERATION])

    @staticmethod
    def book_generation(scores: dict, metrics: dict, examples: int, prefix: str = "") -> None:
        """Move a generative evaluation's throughput out of its scores into the round's metrics and the log."""
        tokens, seconds = scores.pop("generated_tokens", None), scores.pop("generate_seconds", None)
        if tokens is None:
            return
        rate = tokens / seconds if seconds else None
        metrics[f"{prefix}eval_tokens_per_s"] = rate
        metrics[f"{prefix}eval_generated_tokens"] = tokens
        log.info("round %d: %sglobal test on %d examples: %d tokens generated in %.1f s (%s tokens/s)",
                 metrics["round"], "final " if prefix else "", examples, tokens, seconds,
                 "–" if rate is None else f"{rate:.1f}")

    def aggregate(self, updates, labels, sizes, metrics, measured: bool = True) -> None:
        """The method's aggregate of the updates becomes the global adapter. `measured`: the updates are the
        clients' own, so the aggregation error against ΔW* means something (not for the secure sum's one mean)."""
        weights = sizes if self.config.weighting == "examples" else None
        # the global adapter keeps the run's largest rank whichever clients were sampled (flora's is its stack)
        result = aggregate_adapters(updates, self.method, weights, labels,
                                    rank=None if self.method.merges else self.rank,
                                    scaling=self.slots.scaling(self.modules[0], self.rank),
                                    round_=metrics["round"], feedback=self.feedback, device=self.device)
        release_memory()
        report = result.report
        if measured and not self.method.personal_B:  # fedsa's server never sees B, so it cannot know ΔW*
            metrics.update(relative_error=report.relative_error, error_floor=report.error_floor,
                           fedit_error=report.fedit_error, **report.diagnostics)
        if self.feedback is not None:  # kept on the CPU with the rest of the server's state
            self.feedback = {m: LoraModule(A=r.A.cpu(), B=r.B.cpu()) for m, r in result.feedback.items()}
            metrics.update(feedback_norm=report.feedback_norm, feedback_relative=report.feedback_relative,
                           feedback_dropped=report.feedback_dropped)
        change = factor_change(result.adapter) if self.method.merges else result.base_change
        if change:
            self.slots.set_base_delta(apply_change(self.slots.base_delta, change))
            self.base_round, self.last_change = metrics["round"], change
        new, shared, old = result.adapter.state_dict(), self.wire_keys(self.initial, up=False), self.global_tensors
        # what the server does not send (flora's LoRA, ffa's A, fedsa's B) stays at its initial value
        self.global_tensors = {k: new[k].to("cpu", v.dtype) if k in shared else v for k, v in self.initial.items()}
        for k, v in self.global_tensors.items():
            if (factor := factor_of(k)) is not None and not torch.equal(v, old[k]):
                self.changed[factor] = metrics["round"]

    # ---- outputs --------------------------------------------------------------------------------------
    def save_global(self, directory: Path) -> None:
        """The global model as a PEFT directory, plus base_update.safetensors when the method changed the base."""
        save_adapter(self.slots.adapter(self.global_tensors), directory, self.slots.base_delta)


def factor_of(key: str) -> str | None:
    """'A' or 'B' for an adapter tensor that is a LoRA factor, None for any other (a classification head)."""
    return "A" if ".lora_A." in key else "B" if ".lora_B." in key else None


@dataclass
class RunResult:
    run_dir: Path
    config: RunConfig
    history: list[dict] = field(default_factory=list)


def resumed_config(run_dir: Path, requested: RunConfig | None = None) -> RunConfig:
    """The config to resume run_dir with: its stored config.toml, or `requested` where that differs from it only
    in rounds beyond those done (an extension), in the device (where it runs: a checkpoint is CPU tensors) or in
    other methods' keys (run_differences), written to config.toml at once, so that every runtime resumes with it.
    Any other difference is an error naming the keys."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise FloranaError(f"{run_dir}: nothing to resume (no config.toml)")
    stored = load_config(path)
    if requested is None or requested == stored:
        return stored
    changes = run_differences(stored, requested)
    others = {k: v for k, v in changes.items() if k not in ("rounds", "device")}
    if others:
        raise FloranaError(f"{run_dir}: a resumed run keeps its config, but {describe(others)} differ(s) from its "
                           "config.toml (only rounds may change, to extend the run, and the device)")
    done = latest_round(run_dir)
    if "rounds" not in changes:
        write_text_atomic(path, requested.to_toml())
        return requested
    if requested.rounds <= done:
        raise FloranaError(f"{run_dir}: {done} round(s) are done; rounds={requested.rounds} cannot extend the run")
    if stored.method == "local" and done >= stored.rounds:
        raise FloranaError(f"{run_dir}: a finished local run cannot be extended (its global score is taken at its "
                           f"last round, {stored.rounds}); start a new run")
    write_text_atomic(path, requested.to_toml())
    return requested


def open_run(config: RunConfig | None, run_dir: Path, *, resume: bool = False, progress=None,
             split=None, secret_dp: bool = False) -> tuple[Federation, int]:
    """Set up run_dir (config.toml, partition.json, run.log, a line in sessions.jsonl) and the federation, restored from the last checkpoint
    when resuming (with `config`, only to extend it by more rounds); returns it with the first round still to run.
    Both runtimes start here; `split(config)`, where given, supplies the examples (a Flower server whose nodes
    bring their own data); `secret_dp` draws DP's randomness from OS entropy (Federation)."""
    run_dir = Path(run_dir)
    if resume:
        config = resumed_config(run_dir, config)
    else:
        check_run_folder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _attach_log(run_dir)
    fed = Federation(config, progress, split=None if split is None else split(config), secret_dp=secret_dp)
    if not resume:
        write_text_atomic(run_dir / "config.toml", config.to_toml())
    write_text_atomic(run_dir / "partition.json", json.dumps(fed.data.stats, indent=1))
    start = 1
    found = latest_checkpoint(run_dir) if resume else None
    if found:
        round_, tensors, meta = found
        fed.load_state(tensors, meta)
        start = round_ + 1
        log.info("resuming %s after round %d of %d", run_dir, round_, config.rounds)
    record_session(run_dir, start, fed.precision.name)
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in fed.history))
    if progress:
        progress.start_run(config, start)
    return fed, start


def record_round(fed: Federation, run_dir: Path, metrics: dict) -> None:
    """Append a closed round to the history and make it durable: checkpoint first, then metrics.jsonl; then drop
    the checkpoints beyond the newest keep_checkpoints."""
    fed.history.append(metrics)
    save_checkpoint(run_dir, metrics["round"], fed.state_tensors(), fed.state_meta())
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in fed.history))
    prune_checkpoints(run_dir, fed.config.keep_checkpoints)
    log.info("round %d/%d %s: global acc %s, local mean %s (own majority %s), error %s, up %s B, down %s B",
             metrics["round"], fed.config.rounds, fed.config.method, _fmt(metrics["global_accuracy"]),
             _fmt(metrics["local_accuracy_mean"]), _fmt(metrics.get("local_majority_mean")),
             _fmt(metrics["relative_error"]), metrics["bytes_up"], metrics["bytes_down"])
    if "final_global_accuracy" in metrics:
        log.info("final global acc %s on the whole test set (%d examples)", _fmt(metrics["final_global_accuracy"]),
                 len(fed.data.test))
    if fed.progress:
        fed.progress.end_round(metrics)


def close_run(fed: Federation, run_dir: Path) -> RunResult:
    """The run's final outputs: global_adapter/ and plots/."""
    from florana.report.plots import plot_runs

    fed.save_global(run_dir / "global_adapter")
    plot_runs({fed.config.method: fed.history}, run_dir / "plots")
    return RunResult(run_dir, fed.config, fed.history)


def run(config: RunConfig | None, run_dir: Path, *, resume: bool = False, progress=None) -> RunResult:
    """Run (or resume) a federation in this process into run_dir: config.toml, partition.json, metrics.jsonl,
    checkpoints/, global_adapter/ and plots/."""
    run_dir = Path(run_dir)
    if (resumed_config(run_dir) if resume else config).secagg:
        raise FloranaError("secagg=true is for the Flower runtime (florana run --runtime flower, or flwr run .): in "
                           "one process the server computes from every client's update itself, so secure "
                           "aggregation would hide nothing")
    with holding(run_dir, new=not resume):
        fed, start = open_run(config, run_dir, resume=resume, progress=progress)
        for r in range(start, fed.config.rounds + 1):
            try:
                metrics = fed.round(r)
            except BudgetSpent as e:  # the rounds done are kept and closed, then the run says why it stopped
                log.warning("%s", e)
                if fed.history:
                    close_run(fed, run_dir)
                raise
            record_round(fed, run_dir, metrics)
        return close_run(fed, run_dir)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def _attach_log(run_dir: Path) -> None:
    path = str(run_dir / "run.log")
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FloranaError(f"{run_dir}: no metrics.jsonl (not a florana run folder)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

