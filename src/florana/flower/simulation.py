"""`florana run --runtime flower`: the ServerApp and ClientApp in Flower's simulation engine (Ray), one command.

One virtual SuperNode per client; each Ray worker gets `threads` CPUs, so on a small machine clients train one
after another with the same thread count as the in-process engine (which is what keeps the two runs equal).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from florana.config import RunConfig, load_config
from florana.errors import FloranaError
from florana.federation.engine import RunResult, read_metrics
from florana.flower.server import check_runtime, server_app


def run(config: RunConfig | None, run_dir: Path, *, resume: bool = False, min_nodes: int = 1,
        round_timeout: float = 3600.0) -> RunResult:
    """Simulate the federation on Flower into run_dir (the same folder the in-process engine writes)."""
    from flwr.simulation import run_simulation

    from florana.flower.client import app as client_app

    run_dir = Path(run_dir).resolve()
    if resume:
        if not (run_dir / "config.toml").is_file():
            raise FloranaError(f"{run_dir}: nothing to resume (no config.toml)")
        config = load_config(run_dir / "config.toml")
    check_runtime(config)
    cpus = os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": min(config.threads, cpus), "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "ERROR", "log_to_driver": True,
                             "include_dashboard": False}}
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(server_app(None if resume else config, run_dir, resume=resume, min_nodes=min_nodes,
                              round_timeout=round_timeout, node_wait=60.0),
                   client_app, num_supernodes=config.num_clients, backend_config=backend)
    return RunResult(run_dir, config, read_metrics(run_dir))
