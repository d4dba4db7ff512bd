"""What a client's local accuracy scores without learning anything: each client answering its own training data's
majority class, and answering the federation's, on the held-out examples its local accuracy is computed on (mean over
the clients that have some, as the runs' `local_accuracy_mean`). The floor to read local accuracy against on a
label-skewed split (README, "Privacy").

    PYTHONPATH=src .venv/bin/python scripts/majority_floor.py [--config configs/default.toml] [--seeds 0,1,2]
        [--alpha 0.5]
"""

from __future__ import annotations

import argparse

import numpy as np

from florana.config import RunConfig, load_config
from florana.federation.engine import load_split
from florana.train.tasks import majority_accuracy


def floors(config: RunConfig) -> tuple[float, float]:
    """(own-majority, federation-majority) accuracy on the clients' held-out parts, mean over clients."""
    split = load_split(config)
    pooled = [int(y) for t in split.trains for y in t.labels]
    own, federation = [], []
    for train, test in zip(split.trains, split.tests):
        if not len(test) or not len(train):
            continue
        held = [int(y) for y in test.labels]
        own.append(majority_accuracy([int(y) for y in train.labels], held))
        federation.append(majority_accuracy(pooled, held))
    return float(np.mean(own)), float(np.mean(federation))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--alpha", type=float, default=None, help="the partition's Dirichlet α (default: the config's)")
    args = ap.parse_args()
    base = load_config(args.config).with_overrides(alpha=args.alpha)
    for seed in (int(s) for s in args.seeds.split(",")):
        own, federation = floors(base.with_overrides(seed=seed))
        print(f"seed {seed}: own majority class {own:.4f}, the federation's majority class {federation:.4f}")


if __name__ == "__main__":
    main()
