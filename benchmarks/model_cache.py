"""What the ClientApp's model cache saves per round: the same Flower run (real ServerApp strategy and ClientApp, the
transport a function call in this process) with the node process's cache kept (as a Ray actor of the simulation
keeps it) and emptied before every message (as a deployment, where Flower 1.42 starts a fresh flwr-clientapp
process per message, has it), plus what that fresh process pays before florana runs at all (a new interpreter
importing the ClientApp: Python, torch, transformers, peft, flwr).

    .venv/bin/python benchmarks/model_cache.py [--clients 2] [--rounds 3] [--steps 5] [--model minilm]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict

from florana.config import RunConfig
from florana.federation.engine import Federation, read_metrics
from florana.flower import client
from florana.flower.server import serve


class Grid:
    """Flower's Grid in this process: each message goes to florana's ClientApp with its node's Context (its state
    kept across rounds, as a SuperNode keeps it); `fresh` empties the model cache before every message."""

    def __init__(self, nodes: int, run_id: int, fresh: bool):
        self.fresh = fresh
        self.contexts = {100 + i: Context(run_id=run_id, node_id=100 + i, state=RecordDict(), run_config={},
                                          node_config={"partition-id": i, "num-partitions": nodes})
                         for i in range(nodes)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            if self.fresh:
                client._worker.clear()
            try:
                replies.append(client.app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as e:  # as a SuperNode reports a failed ClientApp
                replies.append(Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg))
        return replies


def import_seconds() -> float:
    """A fresh interpreter importing the ClientApp, as each deployed message's flwr-clientapp process does."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import florana.flower.client"], check=True, env=os.environ)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--model", default="minilm")
    args = p.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    work = Path(tempfile.mkdtemp(prefix="cache-"))
    try:
        os.environ.setdefault("MPLCONFIGDIR", str(work / "mpl"))
        cfg = RunConfig(model=args.model, num_clients=args.clients, rounds=args.rounds, local_steps=args.steps,
                        test_size=200, threads=max(1, os.cpu_count() or 1))
        print(f"config: {cfg.model} + LoRA r={cfg.lora_r}, {cfg.num_clients} clients, {cfg.rounds} rounds, "
              f"{cfg.local_steps} local steps, {cfg.threads} thread(s), {os.cpu_count()} CPUs")
        rows = []
        # the emptied run first: whatever this process warms up once (imports, file caches) favours the kept run less
        for run_id, (name, fresh) in enumerate([("cache emptied per message (deployment)", True),
                                                ("cache kept (simulation: Ray actor)", False)], start=1):
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
            client._worker.clear()
            loads = len(client.LOADS)
            t0 = time.perf_counter()
            serve(Grid(args.clients, run_id, fresh), cfg, work / f"run{run_id}", node_wait=5)
            wall = time.perf_counter() - t0
            rounds = [m["seconds"] for m in read_metrics(work / f"run{run_id}")]
            rows.append((name, wall, statistics.mean(rounds[1:] or rounds), len(client.LOADS) - loads))
        client._worker.clear()
        imports = statistics.median(import_seconds() for _ in range(3))
        load_s = []
        for _ in range(2):  # what one load costs: the model and the node's data, as a message without the cache pays
            t0 = time.perf_counter()
            Federation(cfg)
            load_s.append(time.perf_counter() - t0)
        rows.reverse()
        base = rows[0][2]
        print("\n| ClientApp process | whole run s | s/round (rounds 2..) | × cached | model loads |")
        print("|---|---|---|---|---|")
        for name, wall, per_round, loads in rows:
            print(f"| {name} | {wall:.1f} | {per_round:.1f} | {per_round / base:.2f}× | {loads} |")
        print(f"\none load of the model and the node's data (what each message without the cache pays): "
              f"{statistics.median(load_s):.1f} s")
        print(f"a fresh interpreter importing the ClientApp: {imports:.1f} s, paid by every deployed message on top "
              f"(a round with {args.clients} clients in parallel pays it once in wall time, {args.clients}× in CPU)")

    finally:  # the runs' folders, checkpoints included, are not the benchmark's output
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
