#!/usr/bin/env bash
# The evidence sweep of issue 14, in the order its answers are needed: FedIT, FLoRA-NA and the rank-r SVD first, then
# every other aggregator and both bounds at the default α, then α = 0.1 and 1.0. Two streams split the seeds (a: seed
# 0, b: seeds 1 and 2), each one torch thread: two single-thread runs side by side beat one two-thread run on this
# 2-core machine. Each `florana compare` reuses its folder's finished runs and resumes an unfinished one, so a killed
# sweep restarts where it stopped: start both streams again. Runs go under $SWEEP (not committed);
# scripts/sweep_results.sh summarises the finished ones into results/.
#   for s in a b; do nohup setsid nice -n 19 scripts/sweep_evidence.sh $s > runs/sweep-$s.log 2>&1 & done
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

case "${1:?stream a or b}" in
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
  *) echo "stream a or b" >&2; exit 2 ;;
esac
