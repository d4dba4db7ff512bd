#!/usr/bin/env python
"""A Flower deployment on this machine: SuperLink + N SuperNodes on 127.0.0.1, a florana run against them with
`flwr run`, then every process stopped. Add --tls (and --auth) to run it with the certificates that
scripts/make_certs.sh makes.

    python scripts/loopback_federation.py --nodes 2 --config configs/default.toml --out runs/loopback
    python scripts/loopback_federation.py --nodes 2 --tls --auth --certs runs/certs --out runs/loopback-tls
    python scripts/loopback_federation.py --node-data a.csv,b.csv --out runs/private   # one node per own file
    python scripts/loopback_federation.py --nodes 2 --node-data c.csv --out runs/mixed  # 2 partitions + 1 own file
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from florana.config import RunConfig, load_config
from florana.errors import FloranaError
from florana.flower.deploy import Loopback

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, help="SuperNodes on partitions of the run's dataset (default 2, or 0 with "
                                              "--node-data)")
    p.add_argument("--node-data", default="", help="comma-separated data files: one more SuperNode per file, "
                                                   "training on that file only (node config data-path)")
    p.add_argument("--config", type=Path, help="florana TOML config (default: the built-in defaults)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--home", type=Path, help="FLWR_HOME and logs (default: OUT/.flower)")
    p.add_argument("--tls", action="store_true", help="TLS between SuperNodes, flwr and the SuperLink")
    p.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
    p.add_argument("--certs", type=Path, help="credentials folder (default: HOME/certs, made if missing)")
    p.add_argument("--min-nodes", type=int, default=1)
    p.add_argument("--round-timeout", type=float, default=3600.0)
    args = p.parse_args()
    files = [Path(f).resolve() for f in args.node_data.split(",") if f.strip()]
    args.nodes = args.nodes if args.nodes is not None else 0 if files else 2
    total = args.nodes + len(files)
    try:
        config = load_config(args.config) if args.config else RunConfig()
        config = config.with_overrides(num_clients=total)
        home = (args.home or args.out / ".flower").resolve()
        certs = None
        if args.tls or args.auth:
            certs = (args.certs or home / "certs").resolve()
            if not (certs / "ca.crt").is_file() or (args.auth and not (certs / "node-0").is_file()):
                subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(certs), str(total)], check=True)
        with Loopback(home, total, certs=certs, auth=args.auth) as federation:
            federation.start_superlink()
            for i in range(args.nodes):
                federation.start_node(i)
            for j, path in enumerate(files):
                federation.start_node(args.nodes + j, node_config=f'data-path="{path}"', name=f"supernode-data-{j}")
            print(f"SuperLink on 127.0.0.1:{federation.port} ({'TLS' if certs else 'insecure'}"
                  f"{', node auth' if args.auth else ''}), {args.nodes} SuperNodes on partitions, {len(files)} on "
                  f"their own data; logs in {home / 'logs'}")
            out = federation.run(ROOT, config, args.out, min_nodes=args.min_nodes, round_timeout=args.round_timeout)
        print(f"run folder: {out.resolve()}")
    except FloranaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
