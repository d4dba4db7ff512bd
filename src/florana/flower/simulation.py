"""`florana run --runtime flower`: the ServerApp and ClientApp in Flower's simulation engine (Ray), one command.

One virtual SuperNode per client; each Ray worker gets `threads` CPUs, so on a small machine clients train one
after another with the same thread count as the in-process engine (which is what keeps the two runs equal).
GPUs: `gpus_per_client` (`--gpus-per-client`) is the share of a GPU Ray gives each client (0.25: four at once on
one GPU); Ray then shows each worker its GPU as cuda:0, so the run's device is `auto` or `cuda`. With 0, Ray hides
the GPUs from the clients (they train on the CPU) while the ServerApp, in this process, may still use one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from florana.config import RunConfig
from florana.errors import FloranaError
from florana.federation.engine import RunResult, read_metrics, resumed_config
from florana.flower.server import check_runtime, server_app

RAY_TMPDIR_MAX = 36


def backend_config(config: RunConfig, cpus: int, gpus_per_client: float, gpus: int) -> dict:
    """Flower's Ray backend config: each client gets `threads` CPUs and `gpus_per_client` of a GPU; Ray gets the
    machine's `cpus` and `gpus`. An error where the clients are to use a GPU that is not there."""
    if gpus_per_client < 0:
        raise FloranaError(f"--gpus-per-client must be >= 0, got {gpus_per_client}")
    if gpus_per_client > 0 and gpus == 0:
        raise FloranaError(f"--gpus-per-client {gpus_per_client:g}: this machine has no CUDA GPU")
    if gpus_per_client > 1 and gpus_per_client != int(gpus_per_client):
        raise FloranaError(f"--gpus-per-client {gpus_per_client:g}: Ray takes a share of one GPU (≤ 1) or a whole "
                           "number of GPUs")
    if gpus_per_client == 0 and config.device.startswith("cuda"):
        raise FloranaError(f"device = {config.device!r}, but clients get no GPU: give them a share with "
                           "--gpus-per-client (e.g. 0.25), or use device = 'auto'")
    return {"client_resources": {"num_cpus": min(config.threads, cpus), "num_gpus": float(gpus_per_client)},
            "init_args": {"num_cpus": cpus, "num_gpus": gpus, "logging_level": "ERROR", "log_to_driver": True,
                          "include_dashboard": False}}


def run(config: RunConfig | None, run_dir: Path, *, resume: bool = False, min_nodes: int = 1,
        round_timeout: float = 3600.0, gpus_per_client: float = 0.0) -> RunResult:
    """Simulate the federation on Flower into run_dir (the same folder the in-process engine writes)."""
    from flwr.simulation import run_simulation

    from florana.flower.client import app as client_app

    run_dir = Path(run_dir).resolve()
    if resume:  # needed before Ray starts: it sizes the federation
        config = resumed_config(run_dir)
    check_runtime(config)
    ray_tmp = os.environ.get("RAY_TMPDIR", tempfile.gettempdir())
    if len(ray_tmp) > RAY_TMPDIR_MAX:
        raise FloranaError(f"RAY_TMPDIR={ray_tmp} is too long for Ray's Unix sockets (at most {RAY_TMPDIR_MAX} "
                           "characters: Ray appends about 70 and Linux allows 107); choose a shorter folder")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = backend_config(config, os.cpu_count() or 1, gpus_per_client, gpus)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    # Ray hides the GPUs from a worker given none only while this is on (its default, which warns that it will
    # change): on where clients must not see the GPUs; off (no warning) where there are none to hide, or every
    # client gets a GPU (Ray then shows it its own)
    os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "1" if gpus and not gpus_per_client else "0"
    try:
        run_simulation(server_app(None if resume else config, run_dir, resume=resume, min_nodes=min_nodes,
                                  round_timeout=round_timeout, node_wait=60.0),
                       client_app, num_supernodes=config.num_clients, backend_config=backend)
    except RuntimeError as e:  # Flower wraps what went wrong; surface florana's own error, or the root cause
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, FloranaError):
            cause = cause.__cause__
        if isinstance(cause, FloranaError):
            raise cause from None
        raise FloranaError(f"the Flower simulation failed: {type(cause).__name__}: {cause} "
                           f"(log: {run_dir / 'run.log'})") from None
    return RunResult(run_dir, config, read_metrics(run_dir))
