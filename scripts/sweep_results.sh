#!/usr/bin/env bash
# Summarise the sweep's FINISHED runs (those that wrote their global adapter) into results/<table>/, the folders that
# are committed: summary.md/csv, paired.csv, runs.csv, rounds.csv, plots/, run_configs/, provenance.json. Unfinished
# runs are left out, so a table never mixes a 40-round run with a half-done one. Safe to run while the sweep goes on.
# One sweep folder feeds several tables (scripts/sweep_evidence.sh): the aggregators on the default config, issue 12's
# privacy table (its DP runs and the same methods' runs without DP), issue 14's ablation (the options' runs and the
# default's at the same α).
set -euo pipefail
cd "$(dirname "$0")/.."
FLORANA=${FLORANA:-.venv/bin/florana}
SWEEP=${SWEEP:-runs/sweep}

# table NAME FOLDER PATTERN [NEEDS]: results/NAME from the finished runs of $SWEEP/FOLDER whose names match PATTERN
# (an extended regex), written only when one of them matches NEEDS (default: any)
table() {
    local name=$1 folder=$SWEEP/$2 pattern=$3 needs=${4:-.} finished=() run base
    [ -d "$folder" ] || return 0
    for run in "$folder"/*/; do
        base=$(basename "$run")
        [ -d "$run/global_adapter" ] && [[ $base =~ $pattern ]] && finished+=("${run%/}")
    done
    [ ${#finished[@]} -eq 0 ] && return 0
    printf '%s\n' "${finished[@]##*/}" | grep -Eq -- "$needs" || return 0
    rm -rf "results/$name"
    "$FLORANA" report "${finished[@]}" --out "results/$name" > /dev/null
    rm -rf "results/$name/.mpl"  # matplotlib's cache
    echo "results/$name: ${#finished[@]} finished runs"
}

# the headline tables hold FLoRA-NA's default and the paper's estimate (florana_prox = 0) beside the others
table rotten_tomatoes rotten_tomatoes '^[a-z_]+-alpha[0-9.]+-(florana_prox0-)?seed[0-9]+$'
table rotten_tomatoes_privacy rotten_tomatoes \
    '^(fedit|ffa|fedsa|florana|svd)-alpha0\.5-(dpsample-dp_epsilon[0-9.]+-)?(florana_prox0-)?seed[0-9]+$' 'dpsample'
table rotten_tomatoes_ablation rotten_tomatoes \
    '^(fedit|florana|svd)-alpha0\.[15]-((florana_[a-z]+|svd_split)[A-Za-z0-9._]*-)*seed[0-9]+$' '(florana_|svd_split)'
table twenty_newsgroups twenty_newsgroups '.'
table arithmetic arithmetic '.'
