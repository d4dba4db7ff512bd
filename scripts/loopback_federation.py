#!/usr/bin/env python
"""A Flower deployment on this machine: SuperLink + N SuperNodes on 127.0.0.1, a florana run against them with
`flwr run`, then every process stopped. Add --tls (and --auth) to run it with the certificates that
scripts/make_certs.sh makes.

    python scripts/loopback_federation.py --nodes 2 --config configs/default.toml --out runs/loopback
    python scripts/loopback_federation.py --nodes 2 --tls --auth --certs runs/certs --out runs/loopback-tls
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
    p.add_argument("--nodes", type=int, default=2, help="SuperNodes (= num_clients of the run)")
    p.add_argument("--config", type=Path, help="florana TOML config (default: the built-in defaults)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--home", type=Path, help="FLWR_HOME and logs (default: OUT/.flower)")
    p.add_argument("--tls", action="store_true", help="TLS between SuperNodes, flwr and the SuperLink")
    p.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
    p.add_argument("--certs", type=Path, help="credentials folder (default: HOME/certs, made if missing)")
    p.add_argument("--min-nodes", type=int, default=1)
    p.add_argument("--round-timeout", type=float, default=3600.0)
    args = p.parse_args()
    try:
        config = load_config(args.config) if args.config else RunConfig()
        config = config.with_overrides(num_clients=args.nodes)
        home = (args.home or args.out / ".flower").resolve()
        certs = None
        if args.tls or args.auth:
            certs = (args.certs or home / "certs").resolve()
            if not (certs / "ca.crt").is_file() or (args.auth and not (certs / "node-0").is_file()):
                subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(certs), str(args.nodes)], check=True)
        with Loopback(home, args.nodes, certs=certs, auth=args.auth).start() as federation:
            print(f"SuperLink on 127.0.0.1:{federation.port} ({'TLS' if certs else 'insecure'}"
                  f"{', node auth' if args.auth else ''}), {args.nodes} SuperNodes; logs in {home / 'logs'}")
            out = federation.run(ROOT, config, args.out, min_nodes=args.min_nodes, round_timeout=args.round_timeout)
        print(f"run folder: {out.resolve()}")
    except FloranaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
