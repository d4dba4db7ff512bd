#!/usr/bin/env bash
# Summarise the sweep's FINISHED runs (those that wrote their global adapter) into results/<table>/, the folders that
# are committed: summary.md/csv, paired.csv, runs.csv, rounds.csv, plots/, run_configs/, histories/, provenance.json.
# Unfinished runs are left out, so a table never mixes a 40-round run with a half-done one. Safe to run while the
# sweep goes on. A table also takes the runs the committed summaries of its task record (results/<task>*/): the run
# folders of an earlier machine are gone, their records are not, so the tables grow across machines. A table whose
# runs and histories are unchanged is left as it is, unless named after `--rewrite` (to redo its tables after a change
# to florana's report; a table of runs summarised before summaries kept histories loses the local-global gap its old
# runs.csv never kept that way, so name only the tables the change affects).
# One sweep folder feeds several tables (scripts/sweep_evidence.sh): the aggregators on the default config, issue 12's
# privacy table (its DP runs and the same methods' runs without DP), issue 14's ablation (the options' runs and the
# default's at the same α).
set -euo pipefail
cd "$(dirname "$0")/.."
FLORANA=${FLORANA:-.venv/bin/florana}
SWEEP=${SWEEP:-runs/sweep}
REWRITE=" ${*:2} "  # the tables named after --rewrite, space-separated
[ $# -eq 0 ] || [ "$1" = --rewrite ] || { echo "usage: $0 [--rewrite TABLE...]" >&2; exit 2; }

# table NAME FOLDER PATTERN [NEEDS [TARGET]]: results/NAME from the runs whose names match PATTERN (an extended regex)
# among the finished runs of $SWEEP/FOLDER and the runs recorded in results/FOLDER*/ (results/NAME's own records
# first, so its groups keep the per-round rows it recorded), written only when one of them matches NEEDS (default:
# any), timing the first reaching of accuracy TARGET (default: report's)
table() {
    local name=$1 folder=$SWEEP/$2 pattern=$3 needs=${4:-.} target=${5:-} sources=() run tmp
    for run in "results/$name" "results/$2" "results/$2"_*; do
        [ -f "$run/provenance.json" ] && [[ " ${sources[*]} " != *" $run "* ]] && sources+=("$run")
    done
    if [ -d "$folder" ]; then
        for run in "$folder"/*/; do
            [ -d "$run/global_adapter" ] && [[ $(basename "$run") =~ $pattern ]] && sources+=("${run%/}")
        done
    fi
    [ ${#sources[@]} -eq 0 ] && return 0
    tmp=$(mktemp -d)
    if ! "$FLORANA" report "${sources[@]}" --runs "$pattern" ${target:+--target "$target"} --out "$tmp" \
            > "$tmp.log" 2>&1; then
        grep -q "no finished rounds" "$tmp.log" || { cat "$tmp.log" >&2; rm -rf "$tmp" "$tmp.log"; return 1; }
        rm -rf "$tmp" "$tmp.log"; return 0
    fi
    rm -rf "$tmp/.mpl" "$tmp.log"  # matplotlib's cache
    if ! tail -n +2 "$tmp/runs.csv" | cut -d, -f1 | grep -Eq -- "$needs" \
            || { [[ $REWRITE != *" $name "* ]] && unchanged "$tmp" "results/$name"; }; then
        rm -rf "$tmp"; return 0
    fi
    rm -rf "results/$name"
    mv "$tmp" "results/$name"
    echo "results/$name: $(($(wc -l < "results/$name/runs.csv") - 1)) finished runs"
}

# unchanged NEW OLD: the same runs, with histories for the same ones, at the same target accuracy
unchanged() {
    [ -f "$2/runs.csv" ] && cmp -s <(tail -n +2 "$1/runs.csv" | cut -d, -f1 | sort) \
        <(tail -n +2 "$2/runs.csv" | cut -d, -f1 | sort) \
        && cmp -s <(ls "$1/histories" 2>/dev/null) <(ls "$2/histories" 2>/dev/null) \
        && cmp -s <(grep -o "Target accuracy [0-9.]*" "$1/summary.md") \
            <(grep -o "Target accuracy [0-9.]*" "$2/summary.md")
}

# the headline tables (each task's) hold FLoRA-NA's default and the paper's estimate (florana_prox = 0) beside the
# others, every run on the task's default config
HEADLINE='^[a-z_]+-alpha[0-9.]+-(florana_prox0-)?seed[0-9]+$'
table rotten_tomatoes rotten_tomatoes "$HEADLINE"
table rotten_tomatoes_privacy rotten_tomatoes \
    '^(fedit|ffa|fedsa|florana|svd)-alpha0\.5-(dpsample-dp_epsilon[0-9.]+-)?(florana_prox0-)?seed[0-9]+$' 'dpsample'
table rotten_tomatoes_ablation rotten_tomatoes \
    '^(fedit|florana|svd)-alpha0\.[15]-((florana_[a-z]+|svd_split)[A-Za-z0-9._]*-)*seed[0-9]+$' '(florana_|svd_split)'
# issue 12's pilot of a DP schedule (FedIT, seed 0): the default schedule with and without DP at ε = 8, and the
# schedules tried for DP (their keys in the run names), with and without DP
table rotten_tomatoes_dp_pilot rotten_tomatoes '^fedit-alpha0\.5-(rounds[0-9]+-.*-|dpsample-dp_epsilon8-)?seed0$' 'rounds'
# FedIT in float32 beside its bfloat16 runs on the same partitions (stream p)
table rotten_tomatoes_precision rotten_tomatoes '^fedit-alpha(0\.1-(bf16false-)?seed[01]|1-(bf16false-)?seed0)$' 'bf16'
# the pooled bound at its own lr beside the shared lr's runs of it and of FedIT
POOLED_LR='^(fedit|centralized)-alpha[0-9.]+-(lr[0-9.]+-)?seed[0-9]+$'
table rotten_tomatoes_centralized_lr rotten_tomatoes "$POOLED_LR" '-lr'
table twenty_newsgroups twenty_newsgroups "$HEADLINE"
table twenty_newsgroups_centralized_lr twenty_newsgroups "$POOLED_LR" '-lr'
# exact match: the untuned model scores 0.10-0.12, FedIT ends at 0.25-0.30 (0.7 is never reached)
table arithmetic arithmetic '.' '.' 0.2
