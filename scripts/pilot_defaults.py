"""The pilot for choosing `make demo`'s defaults (issue 14): candidate defaults, the same for every method, each run
on the default data, model and partition (10 clients, Dirichlet 0.5, seed 0). Runs are written resumably under --out
(a finished run is skipped, an unfinished one resumed), then printed as one table (`--table-only`).

Why the old default (10 rounds × 10 steps, lr 2e-3, uniform weights) ended at the majority answer (0.595): each
client's local steps shift every test example's logit margin toward its own majority label (client 0 by -1.49,
client 8 by +1.43) while the margins' spread grows only from 0.02 to 0.04 (measured in an earlier session), so
the global model's offset is set by the mix of client priors the aggregation aims at. Uniform weights aim at the mean of the clients' fresh
shares, 0.700 on this partition; example weights (FedAvg's) aim at the pooled share, 0.577, next to the test set's
0.595. Measured below: with uniform weights the global loss rose round after round (fedit 0.681 → 0.760, florana
0.694 → 0.898 in 4 rounds) while with example weights it fell.

The grid (overrides of the old default; every candidate keeps batch 16, r=8 on query/value, test_size 1000):
  phase A, the pooled data alone (`centralized`, 10 steps a round, test_size 500, whose majority is 0.620):
    c_lr5e-3, c_lr1e-2            lr 5e-3 learns in 20 steps (0.720); 1e-2 diverges to the majority answer
    c_lr5e-3_qvd                  + LoRA on every dense layer: stopped after 3 rounds to free the CPU
  phase B, federated (10 clients, client_test_max 50):
    r20_k5_lr5e-3                 uniform weights, 20 rounds × 5 steps: majority answer, loss rising (stopped)
    ex_r20_k5_lr2e-3              example weights, lr 2e-3: still at the majority after 4 rounds (stopped)
    ex_r30_k5_lr5e-3              example weights, 30 rounds × 5 steps, lr 5e-3   <- the default
    ex_r40_k3_lr5e-3              example weights, 40 rounds × 3 steps, lr 5e-3

The rule. Planned (the old script's): the best mean final global accuracy over fedit, florana and svd. The load
of the shared machine left time for only a few federated runs, so the rule as applied, said here as it was: among
the candidates whose florana and fedit runs both reached a final accuracy >= 0.70 within a schedule that fits
`make demo`'s 10 minutes, the one with the higher florana final. Only ex_r30_k5_lr5e-3 completed both (florana
0.700 at round 30, fedit 0.785; svd was at 0.770 after 21 of 30 rounds when stopped at the deadline).
ex_r40_k3_lr5e-3 ended florana at 0.748, steadier over its last 14 rounds (0.694-0.758), and had fedit at 0.779
after 30 of 40 rounds when stopped: the next candidate to check. Every other method runs with the chosen values,
untouched.

Measured 2026-11-29/30 on the 2-core machine shared with other engineers' test runs (load average 5-10): two runs
at a time, one torch thread each, so a round's seconds in the table are several times a quiet machine's.

    PYTHONPATH=src nice -n 5 python scripts/pilot_defaults.py --candidates ex_r30_k5_lr5e-3 --methods fedit,florana \\
        --jobs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# overrides of the old default (rounds 10 × local_steps 10, lr 2e-3, batch 16, uniform weights, test_size 1000,
# client_test_max 100)
CANDIDATES: dict[str, dict] = {
    # phase A: how fast the pooled data learns (centralized; 10 clients × local_steps steps per round)
    "c_lr5e-3": {"rounds": 10, "local_steps": 1, "lr": 5e-3, "test_size": 500},
    "c_lr1e-2": {"rounds": 10, "local_steps": 1, "lr": 1e-2, "test_size": 500},
    "c_lr5e-3_qvd": {"rounds": 10, "local_steps": 1, "lr": 5e-3, "test_size": 500,
                     "target_modules": ["query", "value", "dense"]},
    # phase B: federated candidates (fedit, florana)
    "r20_k5_lr5e-3": {"rounds": 20, "local_steps": 5, "lr": 5e-3, "client_test_max": 50},
    "ex_r30_k5_lr5e-3": {"weighting": "examples", "rounds": 30, "local_steps": 5, "lr": 5e-3, "client_test_max": 50},
    "ex_r40_k3_lr5e-3": {"weighting": "examples", "rounds": 40, "local_steps": 3, "lr": 5e-3, "client_test_max": 50},
    "ex_r20_k5_lr2e-3": {"weighting": "examples", "rounds": 20, "local_steps": 5, "lr": 2e-3, "client_test_max": 50},
}
CHOSEN = "ex_r30_k5_lr5e-3"  # the candidate the rule picked: RunConfig's defaults (a test holds them together)
RULE_METHODS = ("fedit", "florana", "svd")


def run_one(out: Path, candidate: str, method: str, threads: int) -> None:
    """One pilot run (in this process), resumed when its folder already holds some rounds."""
    from florana.config import RunConfig
    from florana.federation.engine import run

    run_dir = out / candidate / method
    config = RunConfig(method=method, threads=threads, **CANDIDATES[candidate])
    if finished(out, candidate, method) is not None:
        return
    resume = (run_dir / "config.toml").is_file()
    t0 = time.perf_counter()
    run(None if resume else config, run_dir, resume=resume)
    (run_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")


def history(out: Path, candidate: str, method: str) -> list[dict]:
    """The rounds a run has recorded so far (none if it never started)."""
    path = out / candidate / method / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def finished(out: Path, candidate: str, method: str) -> list[dict] | None:
    h = history(out, candidate, method)
    return h if len(h) >= CANDIDATES[candidate].get("rounds", 10) else None


def score(m: dict) -> float | None:
    """Global accuracy; fedsa has no global model, so its clients' personalised accuracy."""
    return m["global_accuracy"] if m["global_accuracy"] is not None else m["local_accuracy_mean"]


def table(out: Path, candidates: list[str], methods: list[str]) -> str:
    """One row per candidate and method that has run: accuracy at its last recorded round, the best round, the curve
    (a run stopped early says so), and the mean seconds a round took under the load of the moment."""
    lines = ["| candidate | method | rounds done | final acc | best | final loss | global accuracy by round | s/round |",
             "|---|---|---|---|---|---|---|---|"]
    for c in candidates:
        planned = CANDIDATES[c].get("rounds", 10)
        for m in methods:
            h = history(out, c, m)
            if not h:
                continue
            done = f"{len(h)}/{planned}" + ("" if len(h) >= planned else " (stopped)")
            curve = " ".join(f"{score(x):.3f}" for x in h)
            secs = sum(x["seconds"] for x in h) / len(h)
            lines.append(f"| {c} | {m} | {done} | {score(h[-1]):.3f} | {max(score(x) for x in h):.3f} | "
                         f"{h[-1]['global_loss']:.3f} | {curve} | "
                         f"{secs:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("pilot-runs"))
    p.add_argument("--methods", default=",".join(RULE_METHODS))
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets max(1, 2 // jobs) torch threads)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--one", nargs=2, metavar=("CANDIDATE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    candidates = [c for c in args.candidates.split(",") if c]
    threads = max(1, 2 // args.jobs)
    if args.one:
        run_one(args.out, *args.one, threads)
        return
    if not args.table_only:
        todo = [(c, m) for c in candidates for m in methods if finished(args.out, c, m) is None]
        running: list[subprocess.Popen] = []
        for c, m in todo:
            while len(running) >= args.jobs:
                running = [r for r in running if r.poll() is None]
                time.sleep(1)
            print(f"start {c} {m}", flush=True)
            running.append(subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--jobs",
                                             str(args.jobs), "--one", c, m]))
        for r in running:
            r.wait()
    print(table(args.out, candidates, methods))


if __name__ == "__main__":
    main()
