"""What crosses Flower's wire: tensors as ArrayRecords (NumPy .npy, never pickle) and the run config as TOML text.

Pure conversions with checks; both the ServerApp and the ClientApp use them, so the two sides cannot disagree.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict

import numpy as np

import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common import constant as flower_constant
from flwr.supercore.grpc import GRPC_MAX_MESSAGE_LENGTH
from torch import Tensor

from florana.config import FIELDS, RunConfig, config_from_dict, default_of
from florana.errors import FloranaError

# run-config keys that belong to the Flower runtime rather than to a RunConfig; {run_id} in run-dir is Flower's run id
RUNTIME_KEYS = {"run-dir": "runs/flower-{run_id}", "resume": False, "min-nodes": 1, "round-timeout": 3600.0,
                "node-wait": 120.0}
# `num_clients = 0` in a Flower run config (the app's default): one client per partition the nodes report
CLIENTS_FROM_NODES = 0


def to_record(tensors: dict[str, Tensor]) -> ArrayRecord:
    """Tensors (on any device: the wire is CPU memory) → ArrayRecord; bfloat16 (which NumPy lacks) travels as its
    raw 16-bit pattern, so it costs on the wire exactly what the ledger books."""
    return ArrayRecord({k: Array((t.detach().cpu().view(torch.int16) if t.dtype == torch.bfloat16 else
                                  t.detach().cpu()).numpy()) for k, t in tensors.items()})


def _tensor(record: ArrayRecord, key: str, source: str) -> Tensor:
    try:
        return torch.from_numpy(record[key].numpy().copy())
    except (TypeError, ValueError) as e:
        raise FloranaError(f"{source}: array {key} is not a plain NumPy array ({e})") from None


def from_record(record: ArrayRecord, like: dict[str, Tensor], source: str, *, subset: bool = False) -> dict[str, Tensor]:
    """ArrayRecord → tensors with exactly the keys (with `subset`, some of the keys), shapes and dtypes of `like`;
    anything else is an error naming `source` (a node's payload is untrusted input)."""
    keys, expected = set(record.keys()), set(like)
    if keys != expected and not (subset and keys <= expected):
        extra, lacking = sorted(keys - expected), sorted(expected - keys)
        raise FloranaError(f"{source}: payload keys do not match the adapter (unexpected {extra[:3]}, "
                           f"missing {lacking[:3]})")
    out = {}
    for k, ref in like.items():
        if k not in keys:
            continue
        t = _tensor(record, k, source)
        if ref.dtype == torch.bfloat16 and t.dtype == torch.int16:
            t = t.view(torch.bfloat16)
        if tuple(t.shape) != tuple(ref.shape) or not (t.is_floating_point() or t.dtype == ref.dtype):
            raise FloranaError(f"{source}: array {k} has shape {tuple(t.shape)} {t.dtype}, expected "
                               f"{tuple(ref.shape)} {ref.dtype}")
        out[k] = t.to(ref.dtype)
    return out


def base_change_from_record(record: ArrayRecord, shapes: dict[str, tuple[int, int]], source: str) -> dict[str, Tensor]:
    """A base change (lora/base_delta.py keys) → tensors, checked against the modules' (d, k) shapes: dense
    changes are d×k, factor pairs (d×R, R×k), all floating point."""
    out = {k: _tensor(record, k, source) for k in record.keys()}
    for key, t in out.items():
        name, _, kind = key.rpartition(".")
        if name not in shapes or kind not in ("B", "A", "delta", "total") or not t.is_floating_point():
            raise FloranaError(f"{source}: unexpected base change {key} ({t.dtype})")
        d, k = shapes[name]
        partner = out.get(f"{name}.A" if kind == "B" else f"{name}.B")
        ok = {"B": partner is not None and t.dim() == 2 and t.shape[0] == d and tuple(partner.shape) == (t.shape[1], k),
              "A": partner is not None, "delta": tuple(t.shape) == (d, k), "total": tuple(t.shape) == (d, k)}[kind]
        if not ok:
            raise FloranaError(f"{source}: base change {key} has shape {tuple(t.shape)}, expected it to make "
                               f"a {d}×{k} update")
    return out


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record puts on the wire (the arrays' contents; .npy headers and framing not counted,
    as the ledger does not count them)."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in record.values())


# Flower 1.42 moves a message as separate objects, one request each: every Array in chunks of
# FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE bytes (5 MiB unless that variable is set in the sender's environment), every
# other record whole. No request may exceed GRPC_MAX_MESSAGE_LENGTH, 2 GiB − 1 (protobuf's own bound), on either
# transport (gRPC, and the HTTP of the Runtime and Fleet APIs: MAX_PROTOBUF_STREAM_MESSAGE_LENGTH, the same value).
FLOWER_OBJECT_LIMIT = GRPC_MAX_MESSAGE_LENGTH


def check_sendable(content: RecordDict, what: str, *, limit: int | None = None, chunk: int | None = None) -> None:
    """Refuse, before anything is sent, a message Flower cannot carry: one whose largest object (an array chunk,
    or a whole config or metric record) is over Flower's limit per request. The error names the limit, the size and
    the record at fault. `limit`, `chunk`: Flower's (FLOWER_OBJECT_LIMIT; the sender's array chunk size)."""
    limit = FLOWER_OBJECT_LIMIT if limit is None else limit
    chunk = flower_constant.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE if chunk is None else chunk
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                size = len(array.data)
                if min(size, chunk) > limit:
                    raise FloranaError(
                        f"{what}: array {name}/{key} ({size:,} bytes) would travel in pieces of {min(size, chunk):,} "
                        f"bytes (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE={chunk:,}), over Flower's limit of {limit:,} "
                        f"bytes per request (GRPC_MAX_MESSAGE_LENGTH); unset that variable or set it below the limit")
        else:  # a config or metric record travels whole: its values' bytes (strings, byte strings, lists, scalars)
            size = sum(len(v) if isinstance(v, (str, bytes)) else 8 * len(v) if isinstance(v, list) else 8
                       for v in record.values())
            if size > limit:
                raise FloranaError(f"{what}: record {name} holds {size:,} bytes in one piece, over Flower's limit "
                                   f"of {limit:,} bytes per request (GRPC_MAX_MESSAGE_LENGTH)")


def config_from_text(text: str, source: str) -> RunConfig:
    try:
        return config_from_dict(tomllib.loads(text), source)
    except tomllib.TOMLDecodeError as e:
        raise FloranaError(f"{source}: the run config is not valid TOML ({e})") from None


def partition_problem(node: int, partition_id: int, num_partitions: int, num_clients: int) -> str | None:
    """Why a node's partition does not fit the run, or None when it does."""
    if num_partitions != num_clients or not 0 <= partition_id < num_partitions:
        return (f"node {node}: partition-id={partition_id} num-partitions={num_partitions} does not fit the run's "
                f"num_clients={num_clients}")
    return None


def flower_run_config(config: RunConfig) -> dict:
    """The config as Flower run-config values, which are scalars: lists become comma-separated strings."""
    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in asdict(config).items()}


def _integers(key: str, value) -> list:
    """A list of integers given as '4,8,16' (Flower's config values are scalars) or as one integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except (AttributeError, ValueError):
        raise FloranaError(f"run config: {key} should be comma-separated integers, got {value!r}") from None


def split_run_config(run_config: dict, num_partitions: int | None = None) -> tuple[RunConfig, dict]:
    """Flower's flat run config → (RunConfig, runtime options). Lists travel as comma-separated strings, since
    Flower's config values are scalars. num_clients=0 takes `num_partitions`, which the server asks the nodes for."""
    runtime = {k: run_config.get(k, v) for k, v in RUNTIME_KEYS.items()}
    data = {}
    for key, value in run_config.items():
        if key in RUNTIME_KEYS:
            continue
        if key not in FIELDS:
            raise FloranaError(f"run config: unknown key {key!r}; florana keys: {', '.join(FIELDS)}; runtime "
                               f"keys: {', '.join(RUNTIME_KEYS)}")
        if FIELDS[key].type == "list[int]":
            value = _integers(key, value)
        elif isinstance(default_of(key), list) and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        data[key] = value
    if data.get("num_clients") == CLIENTS_FROM_NODES:
        if num_partitions is None:
            raise FloranaError("run config: num_clients=0 (one client per partition the nodes report) needs the "
                               "nodes' num-partitions, which only the ServerApp learns")
        data["num_clients"] = num_partitions
    return config_from_dict(data, "run config"), runtime
