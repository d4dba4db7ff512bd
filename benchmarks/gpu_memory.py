"""Peak GPU memory of federated rounds with 100 clients against 2 clients: one base model however many clients.

The GPU twin of engine_memory.py (peak RSS, which stays the CPU benchmark). Each configuration runs in its own
fresh process on CUDA; the number is the largest `gpu_peak_mib` of its rounds (the engine resets the peak counter
and empties the allocator's cache before each client, and keeps every client's adapter, optimizer state and
personal part off the GPU). Same model, same steps per client; the 100-client run also keeps per-client state
(fedsa's personal B for every client, on the CPU). Target: ratio ≤ 1.1. On a machine without CUDA it says so
and exits.

    .venv/bin/python benchmarks/gpu_memory.py [--steps 2] [--method fedsa] [--model minilm] [--dataset rotten_tomatoes]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys
from florana.config import RunConfig
from florana.federation.engine import Federation
cfg = RunConfig(**json.loads(sys.argv[1]))
fed = Federation(cfg)
peaks = [fed.round(r).get("gpu_peak_mib") for r in range(1, cfg.rounds + 1)]
peak = None if None in peaks else max(peaks)  # None on the CPU
print(json.dumps({"gpu_peak_mib": peak, "rounds": peaks, "personal": len(fed.personal)}))
"""


def measure(num_clients: int, args) -> dict:
    cfg = {"num_clients": num_clients, "local_steps": args.steps, "rounds": 2, "method": args.method,
           "test_size": args.test_size, "client_test_max": 5, "threads": 2, "partition": "iid", "device": args.device,
           "model": args.model, "dataset": args.dataset, **json.loads(args.config)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the {num_clients}-client run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--method", default="fedsa")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--dataset", default="rotten_tomatoes")
    ap.add_argument("--test-size", type=int, default=200)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="{}", help="more RunConfig keys as JSON (e.g. a tiny model's max_length)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_memory: skipped, no CUDA GPU on this machine (benchmarks/engine_memory.py measures the CPU's RSS)")
        return
    small, large = measure(2, args), measure(100, args)
    ratio = large["gpu_peak_mib"] / small["gpu_peak_mib"]
    print("| clients | peak GPU MiB (max over rounds) | per round | clients holding state |\n|---|---|---|---|")
    for n, m in ((2, small), (100, large)):
        print(f"| {n} | {m['gpu_peak_mib']:.1f} | {', '.join(f'{p:.1f}' for p in m['rounds'])} | {m['personal']} |")
    print(f"\nratio 100 / 2 clients: {ratio:.3f} (target ≤ 1.1: {'met' if ratio <= 1.1 else 'MISSED'})")


if __name__ == "__main__":
    main()
