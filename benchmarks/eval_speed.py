"""Scoring the global model with evaluation batches formed by length (today) against batches in file order (before),
side by side, on the offline default: MiniLM-L6 + LoRA on rotten_tomatoes' 1,000 test examples, eval batch 64, bf16
autocast on the CPU. Scoring the global model on the whole test set was about 40% of a default round.

The model is client 0's after `--steps` local steps (so that its answers vary), then the test set is scored in both
orders `--repeats` times, alternating (the best time of each is kept: on a shared machine other jobs only ever add
time). Prints the time ratio and how many predictions differ between the two orders (padding changes bf16 rounding,
so the loss may move in its last digits).

    PYTHONPATH=src .venv/bin/python benchmarks/eval_speed.py [--steps 20] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from florana.config import load_config
from florana.federation.engine import Federation, derive_seed
from florana.train import tasks


def in_file_order(lengths: list[int], batch_size: int) -> list[list[int]]:
    return [list(range(s, min(s + batch_size, len(lengths)))) for s in range(0, len(lengths), batch_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cfg = load_config(args.config)
    cfg = type(cfg)(**{**cfg.__dict__, "threads": args.threads})
    fed = Federation(cfg)
    fed.params = fed.slots.trainable()
    _, tensors = fed.train_client(fed.client_start(0, 1), fed.data.clients[0].train, args.steps, derive_seed(0, 1))
    test = fed.data.test
    preds, f1 = [], tasks.macro_f1
    tasks.macro_f1 = lambda pred, gold, k: (preds.append(pred.copy()), f1(pred, gold, k))[1]
    by_length, best, scores = tasks.by_length, {}, {}
    for _ in range(args.repeats):
        for name, batches in (("file order", in_file_order), ("by length", by_length)):
            tasks.by_length = batches
            t = time.perf_counter()
            scores[name] = fed.evaluate(tensors, test)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    tasks.by_length = by_length
    lengths = [len(s) for s in test.ids]
    print(f"{len(test)} test examples, {lengths and int(np.median(lengths))} tokens median, {max(lengths)} max; "
          f"eval batch {cfg.eval_batch_size}, {args.threads} thread(s), best of {args.repeats}")
    for name in best:
        s = scores[name]
        print(f"  {name:10s} {best[name]:7.2f} s   accuracy {s['accuracy']:.4f}  macro-F1 {s['macro_f1']:.4f}  "
              f"loss {s['loss']:.5f}")
    print(f"by length / file order time: {best['by length'] / best['file order']:.2f}×; predictions that differ: "
          f"{int((preds[-2] != preds[-1]).sum())} of {len(test)}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
