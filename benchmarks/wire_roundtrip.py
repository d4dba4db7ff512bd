"""A 7B-class LoRA adapter through a loopback deployment (flower-superlink + flower-supernode on 127.0.0.1, `flwr
run` of florana.flower.wirecheck): server → node → server in florana's wire format, timed against a tiny payload's
round trip (Flower's fixed cost per message: polling, a fresh ClientApp process), side by side.

    .venv/bin/python benchmarks/wire_roundtrip.py [--nodes 1] [--repeats 3] [--layers 32 --hidden 4096 --rank 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from florana.flower.deploy import Loopback
from florana.flower.wirecheck import write_app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wrt-"))
    os.environ.setdefault("MPLCONFIGDIR", str(work / "mpl"))
    out = work / "report.json"
    app = write_app(work / "app")
    with Loopback(work / "home", args.nodes).start() as federation:
        federation.flwr("run", str(app), "loopback", "--stream", "--run-config",
                        f"out='{out}' repeats={args.repeats} layers={args.layers} hidden={args.hidden} "
                        f"rank={args.rank}", timeout=3600)
    r = json.loads(out.read_text())
    shutil.rmtree(work, ignore_errors=True)
    mb = r["bytes_each_way_per_node"] / 1e6
    tiny, big = statistics.median(r["tiny_s"]), statistics.median(r["adapter_s"])
    print(f"{args.layers} layers × q,k,v,o at {args.hidden}², r={args.rank}: {mb:.1f} MB each way per node, "
          f"{args.nodes} node(s), medians of {args.repeats}")
    print("\n| payload | round trip s | × tiny | MB/s moved (both ways, all nodes, beyond the tiny round trip) |")
    print("|---|---|---|---|")
    print(f"| tiny (2 arrays) | {tiny:.1f} | 1.00× | – |")
    print(f"| adapter, {mb:.1f} MB | {big:.1f} | {big / tiny:.2f}× | "
          f"{2 * mb * args.nodes / max(big - tiny, 1e-9):.1f} |")


if __name__ == "__main__":
    main()
