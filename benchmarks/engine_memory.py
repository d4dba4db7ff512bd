"""Peak RSS of a federated round with 100 clients against 2 clients: one base model however many clients.

Each configuration runs in its own fresh process (peak RSS is per process), same model (MiniLM-L6 + LoRA),
same steps per client; the 100-client run also keeps per-client state (fedsa's personal B for every client).
Target: ratio ≤ 1.25.

    .venv/bin/python benchmarks/engine_memory.py [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys
from florana.config import RunConfig
from florana.federation.engine import Federation
cfg = RunConfig(**json.loads(sys.argv[1]))
fed = Federation(cfg)
for r in range(1, cfg.rounds + 1):
    fed.round(r)
print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "personal": len(fed.personal)}))
"""


def measure(num_clients: int, steps: int, method: str) -> dict:
    cfg = {"num_clients": num_clients, "local_steps": steps, "rounds": 2, "method": method, "test_size": 200,
           "client_test_max": 5, "threads": 2, "partition": "iid"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--method", default="fedsa")
    args = ap.parse_args()
    small = measure(2, args.steps, args.method)
    large = measure(100, args.steps, args.method)
    ratio = large["peak_rss_kib"] / small["peak_rss_kib"]
    print("| clients | peak RSS MiB | clients holding state |\n|---|---|---|")
    print(f"| 2 | {small['peak_rss_kib'] / 1024:.0f} | {small['personal']} |")
    print(f"| 100 | {large['peak_rss_kib'] / 1024:.0f} | {large['personal']} |")
    print(f"\nratio 100 / 2 clients: {ratio:.3f} (target ≤ 1.25: {'met' if ratio <= 1.25 else 'MISSED'})")


if __name__ == "__main__":
    main()
