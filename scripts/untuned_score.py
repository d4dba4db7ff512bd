"""The untuned model's score on a run's global test set: what a round 0 would report, with the run's own data,
test split, prompt, decoding and scorer (its LoRA starts with B = 0, so the model is the base model).

    PYTHONPATH=src python scripts/untuned_score.py --config configs/arithmetic_smollm2.toml
"""

from __future__ import annotations

import argparse
import json
import time

from florana.config import RunConfig, load_config
from florana.federation.engine import Federation


def untuned_score(config: RunConfig) -> dict:
    """The global metrics of the run's initial adapter on the test set each round scores (eval_max_examples)."""
    fed = Federation(config)
    if any(t.abs().max() > 0 for k, t in fed.initial.items() if ".lora_B." in k):
        raise SystemExit(f"method {config.method}: its initial adapter changes the model (B != 0); use fedit")
    t0 = time.perf_counter()
    scores = fed.evaluate(fed.initial, fed.eval_test)
    return {**scores, "examples": len(fed.eval_test), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: the config's)")
    args = parser.parse_args()
    config = load_config(args.config)
    if args.seed is not None:
        config = config.with_overrides(seed=args.seed)
    print(json.dumps(untuned_score(config.with_overrides(method="fedit"))))


if __name__ == "__main__":
    main()
