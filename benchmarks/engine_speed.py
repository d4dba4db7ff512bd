"""The federation's own overhead: a federated round against a plain PEFT training loop doing the same steps
on the same model and batches, in one process, interleaved (A B A B …) so machine noise hits both alike.

Also measures what the engine's defaults are built on: the precision (bfloat16 autocast where the CPU computes it
natively, float32 elsewhere) and dynamic padding, each against its alternative on the same batches. Target:
federated round ≤ 1.10× the plain loop.

    .venv/bin/python benchmarks/engine_speed.py [--clients 4] [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from florana.config import RunConfig
from florana.federation.engine import Federation, derive_seed
from florana.train.local import batch_indices
from florana.train.device import Precision


def plain_loop(fed: Federation, batches_per_client: list[list[np.ndarray]], pad_to: int | None,
               precision: Precision) -> float:
    """What a user would write with PEFT alone: for each client, AdamW over the trainable tensors, the same
    batches, forward, backward, step. No aggregation, no evaluation, no state handling."""
    model, task = fed.model, fed.task
    t0 = time.perf_counter()
    for u, batches in enumerate(batches_per_client):
        data = fed.data.clients[u].train
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=fed.config.lr)
        model.train()
        for idx in batches:
            batch = task.batch(data, idx)
            if pad_to:
                batch = {k: torch.nn.functional.pad(v, (0, pad_to - v.shape[1]), value=0 if k != "labels" else 0)
                         if v.dim() == 2 else v for k, v in batch.items()}
            with precision.autocast():
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="florana")
    args = ap.parse_args()
    # evaluation is part of a round but not of a training loop: keep it out of both sides (tiny eval sets)
    cfg = RunConfig(num_clients=args.clients, local_steps=args.steps, method=args.method, partition="iid",
                    test_size=1, client_test_max=1, rounds=10**6)
    fed = Federation(cfg)

    def batches_of(round_: int) -> list[list[np.ndarray]]:
        """Exactly the batches the engine draws in that round (same seeds), so both sides see the same data."""
        return [batch_indices(len(fed.data.clients[u].train), cfg.batch_size, cfg.local_steps,
                              np.random.default_rng(derive_seed(cfg.seed, 6, round_, u))) for u in range(args.clients)]

    fed.round(1)  # warm-up
    run, bf16, fp32 = fed.precision, Precision(fed.device, torch.bfloat16), Precision(fed.device, None)
    plain_loop(fed, batches_of(1), None, run)
    rounds, plains, bf16s, fp32s, padded = [], [], [], [], []
    for r in range(2, args.repeats + 2):
        t0 = time.perf_counter()
        fed.round(r)
        rounds.append(time.perf_counter() - t0)
        plains.append(plain_loop(fed, batches_of(r), None, run))
        bf16s.append(plain_loop(fed, batches_of(r), None, bf16))
        fp32s.append(plain_loop(fed, batches_of(r), None, fp32))
        padded.append(plain_loop(fed, batches_of(r), cfg.max_length, run))
    med = statistics.median
    print(f"{args.clients} clients × {args.steps} steps × batch {cfg.batch_size}, MiniLM-L6 + LoRA r={cfg.lora_r}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; the run computes in {run.name} here\n")
    print("| what | seconds | ratio |\n|---|---|---|")
    print(f"| plain PEFT loop ({run.name}, dynamic padding) | {med(plains):.2f} | 1.00 |")
    print(f"| federated round ({args.method}, tiny eval) | {med(rounds):.2f} | {med(rounds) / med(plains):.3f} |")
    print(f"| plain loop, bfloat16 autocast | {med(bf16s):.2f} | {med(bf16s) / med(plains):.2f} |")
    print(f"| plain loop, float32 | {med(fp32s):.2f} | {med(fp32s) / med(plains):.2f} |")
    print(f"| plain loop, padded to max_length={cfg.max_length} | {med(padded):.2f} | "
          f"{med(padded) / med(plains):.2f} |")
    ratio = med(rounds) / med(plains)
    print(f"\nfederation overhead: {ratio:.3f}× (target ≤ 1.10: {'met' if ratio <= 1.10 else 'MISSED'})")


if __name__ == "__main__":
    main()
