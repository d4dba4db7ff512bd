#!/usr/bin/env bash
# Summarise the sweep's FINISHED runs (those that wrote their global adapter) into results/<task>/, the folder that is
# committed: summary.md/csv, paired.csv, runs.csv, rounds.csv, plots/, run_configs/, provenance.json. Unfinished runs
# are left out, so a table never mixes a 40-round run with a half-done one. Safe to run while the sweep goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
FLORANA=${FLORANA:-.venv/bin/florana}
SWEEP=${SWEEP:-runs/sweep}
for task_dir in "$SWEEP"/*/; do
    task=$(basename "$task_dir")
    finished=()
    for run in "$task_dir"*/; do
        [ -d "$run/global_adapter" ] && finished+=("${run%/}")
    done
    [ ${#finished[@]} -eq 0 ] && continue
    rm -rf "results/$task"
    "$FLORANA" report "${finished[@]}" --out "results/$task" > /dev/null
    echo "results/$task: ${#finished[@]} finished runs"
done
