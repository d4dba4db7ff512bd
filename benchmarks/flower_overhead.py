"""Per-round cost of the Flower runtimes against the in-process engine, same config, measured in one run:
Flower's simulation engine (Ray, `florana run --runtime flower`) and a loopback deployment (flower-superlink +
one flower-supernode per client, `flwr run`), plain and with TLS + SuperNode authentication.

A round's time is the engine's `seconds` metric (sampling to the closed, evaluated round); the first round also
pays each runtime's warm-up, so rounds 2.. are reported apart. Whole-run wall time includes start-up.

    .venv/bin/python benchmarks/flower_overhead.py [--clients 2] [--rounds 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from florana.config import RunConfig
from florana.federation.engine import read_metrics, run
from florana.flower.deploy import Loopback

ROOT = Path(__file__).resolve().parent.parent


def timed(fn) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    out_dir = fn()
    return time.perf_counter() - t0, read_metrics(out_dir)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flb-"))  # short: Ray's socket paths live under RAY_TMPDIR
    for var in ("FLWR_HOME", "RAY_TMPDIR", "MPLCONFIGDIR"):
        os.environ.setdefault(var, str(work / var.lower()[:4]))
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    # the offline default (MiniLM-L6, Rotten Tomatoes, FLoRA-NA), fewer clients so each runtime gets one node each
    cfg = RunConfig(num_clients=args.clients, rounds=args.rounds, local_steps=args.steps, test_size=500,
                    threads=max(1, (os.cpu_count() or 2) // args.clients))
    print(f"config: MiniLM-L6 + LoRA r={cfg.lora_r}, {cfg.num_clients} clients, {cfg.rounds} rounds, "
          f"{cfg.local_steps} local steps, {cfg.threads} thread(s) per client, {os.cpu_count()} CPUs")

    def inprocess():
        run(cfg, work / "inprocess")
        return work / "inprocess"

    def simulation():
        from florana.flower.simulation import run as simulate
        simulate(cfg, work / "simulation")
        return work / "simulation"

    def deployment(tls: bool):
        def go():
            certs = None
            if tls:
                certs = work / "certs"
                subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(certs), str(cfg.num_clients)],
                               check=True, capture_output=True)
            name = "deploy-tls" if tls else "deploy"
            with Loopback(work / f"{name}-home", cfg.num_clients, certs=certs, auth=tls).start() as federation:
                federation.run(ROOT, cfg, work / name)
            return work / name
        return go

    rows = []
    for name, fn in [("in-process", inprocess), ("Flower simulation (Ray)", simulation),
                     ("loopback deployment", deployment(False)), ("loopback deployment, TLS + auth", deployment(True))]:
        wall, history = timed(fn)
        first, rest = history[0]["seconds"], [m["seconds"] for m in history[1:]]
        rows.append((name, wall, first, statistics.mean(rest) if rest else first, history[-1]["global_accuracy"]))
        print(f"  {name}: {wall:.1f} s")
    shutil.rmtree(work, ignore_errors=True)
    base = rows[0]
    print("\n| runtime | whole run s | round 1 s | rounds 2.. s/round | × in-process (rounds 2..) | final acc |")
    print("|---|---|---|---|---|---|")
    for name, wall, first, rest, acc in rows:
        print(f"| {name} | {wall:.1f} | {first:.1f} | {rest:.1f} | {rest / base[3]:.2f}× | {acc:.4f} |")


if __name__ == "__main__":
    main()
