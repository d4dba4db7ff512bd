"""`florana run --runtime flower`: the ServerApp and ClientApp in Flower's simulation engine (Ray), one command.

One virtual SuperNode per client; each Ray worker gets `threads` CPUs, so on a small machine clients train one
after another with the same thread count as the in-process engine (which is what keeps the two runs equal).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from florana.config import RunConfig
from florana.errors import FloranaError
from florana.federation.engine import RunResult, read_metrics, resumed_config
from florana.flower.server import check_runtime, server_app

RAY_TMPDIR_MAX = 36


def run(config: RunConfig | None, run_dir: Path, *, resume: bool = False, min_nodes: int = 1,
        round_timeout: float = 3600.0) -> RunResult:
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
    cpus = os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": min(config.threads, cpus), "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "ERROR", "log_to_driver": True,
                             "include_dashboard": False}}
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU only: silences Ray's FutureWarning
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
