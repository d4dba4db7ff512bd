#!/usr/bin/env bash
# The evidence sweep of issue 14, in the order its answers are needed: FedIT, FLoRA-NA and the rank-r SVD on three
# seeds first, then every other aggregator and both bounds on seed 0, then the rest of the grid. Each `florana
# compare` reuses the finished runs of its folder and resumes an unfinished one, so a killed sweep restarts where it
# stopped: run it again. Runs go under $SWEEP (not committed); scripts/sweep_results.sh summarises the finished ones
# into results/.
#   nohup setsid nice -n 19 scripts/sweep_evidence.sh > runs/sweep.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
FLORANA=${FLORANA:-.venv/bin/florana}
SWEEP=${SWEEP:-runs/sweep}
HEAD=fedit,florana,svd
REST=ffa,fedsa,fedex,flora,flexlora,rolora,lora_fair,hetlora,fedsvd,centralized,local
rt() { "$FLORANA" compare --config configs/default.toml --out "$SWEEP/rotten_tomatoes" --quiet "$@"; }

rt --methods "$HEAD" --seeds 0,1,2 --alpha 0.5
rt --methods "$REST" --seeds 0 --alpha 0.5
rt --methods "$REST" --seeds 1,2 --alpha 0.5
rt --methods "$HEAD,$REST" --seeds 0,1,2 --alpha 0.1,1.0
