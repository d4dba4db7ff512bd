"""Cost of DP-SGD (dp = "sample") against the non-private run: time and peak memory of one client's local training,
side by side, on the offline default (MiniLM-L6 + LoRA r=8 on query/value + the head, rotten_tomatoes, batch 16,
max_length 64, bf16 autocast on the CPU).

Each side runs in a fresh process (peak RSS is per process): it builds the federation (model and data), then times
`--steps` local steps of client 0 `--repeats` times (the best is kept: on a shared machine other jobs only ever add
time) and reports the peak RSS over the process's RSS just before training (on a GPU, the peak allocated memory).
The private side trains with per-example gradients (Opacus hooks), per-example clipping, noise and Poisson batches
of expected size 16; the plain side with fixed batches of 16.

    PYTHONPATH=src .venv/bin/python benchmarks/dp_cost.py [--steps 4] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import torch
from florana.config import RunConfig
from florana.federation.engine import Federation, derive_seed
cfg, steps, repeats = RunConfig(**json.loads(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
fed = Federation(cfg)
client = fed.data.clients[0]
start = fed.client_start(0, 1)
fed.params = fed.slots.trainable()
private = 0 if fed.privacy else None
def rss_kib():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
before = rss_kib()
if fed.device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
times = []
for r in range(repeats):
    t = time.perf_counter()
    fed.train_client(start, client.train, steps, derive_seed(0, r), dp_client=private)
    times.append(time.perf_counter() - t)
out = {"seconds_per_step": min(times) / steps, "noise": fed.privacy.noise[0] if fed.privacy else None,
       "peak_extra_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
if fed.device.type == "cuda":
    out["gpu_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
print(json.dumps(out))
"""


def measure(settings: dict, steps: int, repeats: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings), str(steps), str(repeats)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    common = {"num_clients": 2, "max_examples": 1200, "test_size": 200, "rounds": 1, "device": args.device,
              "threads": args.threads, "method": "fedit"}
    plain = measure(common, args.steps, args.repeats)
    private = measure({**common, "dp": "sample", "dp_noise": 1.0, "dp_clip": 1.0}, args.steps, args.repeats)
    print(f"local steps of batch 16 on MiniLM-L6 (LoRA r=8 query/value + head), {args.device}, best of "
          f"{args.repeats} x {args.steps} steps")
    print(f"{'':>22} {'non-private':>12} {'DP-SGD':>12} {'ratio':>8}")
    print(f"{'seconds per step':>22} {plain['seconds_per_step']:>12.3f} {private['seconds_per_step']:>12.3f} "
          f"{private['seconds_per_step'] / plain['seconds_per_step']:>8.2f}")
    keys = [("peak extra RSS, MiB", "peak_extra_mib")] + \
        ([("GPU peak extra, MiB", "gpu_peak_extra_mib")] if "gpu_peak_extra_mib" in plain else [])
    for label, key in keys:
        ratio = private[key] / plain[key] if plain[key] > 0 else float("nan")
        print(f"{label:>22} {plain[key]:>12.1f} {private[key]:>12.1f} {ratio:>8.2f}")


if __name__ == "__main__":
    main()
