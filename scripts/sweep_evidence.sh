#!/usr/bin/env bash
# The evidence sweep of issue 14, in the order its answers are needed: FedIT, FLoRA-NA and the rank-r SVD first, then
# every other aggregator and both bounds at the default α, then α = 0.1 and 1.0. Two streams split the seeds (a: seed
# 0, b: seeds 1 and 2), each one torch thread: two single-thread runs side by side beat one two-thread run on this
# 2-core machine. Each `florana compare` reuses its folder's finished runs and resumes an unfinished one, so a killed
# sweep restarts where it stopped: start both streams again. Runs go under $SWEEP (not committed);
# scripts/sweep_results.sh summarises the finished ones into results/.
#   for s in a b; do nohup setsid nice -n 19 scripts/sweep_evidence.sh $s > runs/sweep-$s.log 2>&1 & done
# Stream c is issue 12's privacy table (sample-level DP at ε = 1, 3, 8; its no-DP rows are streams a and b's runs);
# stream d the causal-LM task (configs/arithmetic_smollm2.toml, into its own folder).
set -euo pipefail
cd "$(dirname "$0")/.."
FLORANA=${FLORANA:-.venv/bin/florana}
SWEEP=${SWEEP:-runs/sweep}
HEAD=fedit,florana,svd
REST=ffa,fedsa,fedex,flora,flexlora,rolora,lora_fair,hetlora,fedsvd,centralized,local
mkdir -p "$SWEEP"
CONFIG="$SWEEP/default-1thread.toml"  # the default, one torch thread (threads is not a setting in the tables)
{ cat configs/default.toml; echo "threads = 1"; } > "$CONFIG"
rt() { "$FLORANA" compare --config "$CONFIG" --out "$SWEEP/rotten_tomatoes" --quiet "$@"; }

case "${1:?stream a, b, c or d}" in
  a)
    # fedit seed 0 began with two threads, before the sweep split into streams
    "$FLORANA" compare --config configs/default.toml --out "$SWEEP/rotten_tomatoes" --quiet --methods fedit \
        --seeds 0 --alpha 0.5
    rt --methods florana,svd --seeds 0 --alpha 0.5
    rt --methods "$REST" --seeds 0 --alpha 0.5
    rt --methods "$HEAD,$REST" --seeds 0 --alpha 0.1,1.0
    ;;
  b)
    rt --methods "$HEAD" --seeds 1,2 --alpha 0.5
    rt --methods "$REST" --seeds 1,2 --alpha 0.5
    rt --methods "$HEAD,$REST" --seeds 1,2 --alpha 0.1,1.0
    ;;
  c)
    rt --methods fedit,ffa,fedsa,florana,svd --seeds 0,1,2 --alpha 0.5 --set dp=sample --set dp_epsilon=1,3,8
    ;;
  d)
    "$FLORANA" compare --config configs/arithmetic_smollm2.toml --out "$SWEEP/arithmetic" --quiet \
        --methods fedit,florana,svd,ffa,fedsa,centralized --seeds 0,1,2
    ;;
  *) echo "stream a, b, c or d" >&2; exit 2 ;;
esac
