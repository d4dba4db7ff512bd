#!/usr/bin/env bash
# The evidence sweeps of issues 14 and 12, as streams of `florana compare` in the order their answers are needed. Each
# compare reuses its folder's finished runs and resumes an unfinished one, so a killed sweep restarts where it
# stopped: start its streams again. Every run is the default config (configs/default.toml) with one torch thread
# (two single-thread runs side by side beat one two-thread run on a 2-core machine); runs go under $SWEEP (not
# committed) and scripts/sweep_results.sh summarises the finished ones into results/. A run that a committed summary
# under $RESULTS records is not run again (compare --reuse): the sweep goes on from its summaries on a new machine.
#   mkdir -p runs && for s in a b; do nohup scripts/sweep_evidence.sh $s >> runs/sweep-$s.log 2>&1 & done
# FLoRA-NA runs at its default (florana_prox = 10, the sweep's own choice) and, as "the paper's estimate", at
# florana_prox = 0 (Eq. 6 alone, the default until the sweep chose it). compare names a run after the keys that
# differ from the default, so the runs made before the default changed were renamed with it.
# a: Rotten Tomatoes at seed 0: FedIT, FLoRA-NA, svd, then every other aggregator and both bounds, then α = 0.1, 1.0
#    (the pooled bound at lr 1e-3 too, as in h).
# b: the same at seeds 1 and 2, with the ablation (f) of seed 2 and issue 12's privacy table (c) after FedIT,
#    FLoRA-NA and svd.
# c [SEEDS]: issue 12: fedit, ffa, fedsa, florana, svd under sample-level DP at ε = 1, 3, 8 (and their runs without
#    DP), for seeds 0 1 2 or the ones given.
# d: the causal-LM task (configs/arithmetic_smollm2.toml) into its own folder.
# e: 20 Newsgroups (the default config on dataset twenty_newsgroups) at α = 0.1 and 1.0, FedIT, FLoRA-NA, svd at seed 0
#    first, then at seeds 1 and 2, then the other methods (the pooled bound at lr 1e-3 too, as in h). Two e streams
#    side by side share its runs out.
# f: issue 14 part 4, the options of the paper's estimate and of svd at α = 0.1 and 0.5 (the default's runs are
#    reused as its rows).
# g: what the default's choice is checked on next: α = 1.0, FedIT and FLoRA-NA on every seed, the default on 20
#    Newsgroups at seed 0, then at α = 1.0 the paper's estimate and svd. Ahead of the rest of a, b, e and f, which reuse
#    these runs. Two g streams side by side share its runs out.
# h: the headline at α = 0.5 first: ffa, fedsa and both bounds on seeds 0-2 (centralized also at lr 1e-3), then every
#    other aggregator on seeds 1 and 2 (the same runs as a's and b's, which reuse them), so each row of the table at
#    α = 0.5 gets its 3 seeds.
# p: FedIT in float32 (bf16 = false) on the partitions where the other aggregators ran in float32 on the AVX2-only
#    machine of 2026-12-01/02 while FedIT ran in bfloat16: how much of a paired difference there is the precision's.
#    Run on a CPU with bfloat16 in hardware (elsewhere bf16 = true computes in float32 too).
set -euo pipefail
cd "$(dirname "$0")/.."
FLORANA=${FLORANA:-.venv/bin/florana}
SWEEP=${SWEEP:-runs/sweep}
RESULTS=${RESULTS:-results}
HEAD=fedit,florana,svd
REST=ffa,fedsa,fedex,flora,flexlora,rolora,lora_fair,hetlora,fedsvd,centralized,local
mkdir -p "$SWEEP"
CONFIG="$SWEEP/default-1thread.toml"  # the default, one torch thread (threads is not a setting in the tables)
{ cat configs/default.toml; echo "threads = 1"; } > "$CONFIG"
NG_CONFIG="$SWEEP/twenty_newsgroups-1thread.toml"  # the same config on the second task: nothing tuned for it
sed 's/^dataset = .*/dataset = "twenty_newsgroups"/' "$CONFIG" > "$NG_CONFIG"
RT_REUSE=() NG_REUSE=()  # --reuse of each committed summary of the task
for d in "$RESULTS"/rotten_tomatoes "$RESULTS"/rotten_tomatoes_*; do
    [ -f "$d/provenance.json" ] && RT_REUSE+=(--reuse "$d")
done
for d in "$RESULTS"/twenty_newsgroups*; do
    [ -f "$d/provenance.json" ] && NG_REUSE+=(--reuse "$d")
done
rt() { "$FLORANA" compare --config "$CONFIG" --out "$SWEEP/rotten_tomatoes" --quiet "${RT_REUSE[@]}" "$@"; }
ng() { "$FLORANA" compare --config "$NG_CONFIG" --out "$SWEEP/twenty_newsgroups" --quiet "${NG_REUSE[@]}" "$@"; }
PAPER=(--methods florana --set florana_prox=0)  # the paper's estimate: FLoRA-NA without the proximal term
privacy() {  # the runs without DP first (shared with streams a and b), then ε = 8, 3, 1 seed by seed
    rt --methods fedit,ffa,fedsa,florana,svd --seeds "$1" --alpha 0.5
    rt --methods fedit,ffa,fedsa,florana,svd --seeds "$1" --alpha 0.5 --set dp=sample --set dp_epsilon=8,3,1
    rt --methods florana --seeds "$1" --alpha 0.5 --set dp=sample --set dp_epsilon=8 --set florana_prox=0
}
ablation() {  # SEED ALPHA: one option at a time against the default's runs (a value equal to the default is its
    # plain run, reused)
    rt --methods fedit,florana,svd --seeds "$1" --alpha "$2"
    rt --methods florana --seeds "$1" --alpha "$2" --set florana_prox=0,0.1,10  # 10: no collapse in 12 rounds of seed 2
    rt "${PAPER[@]}" --seeds "$1" --alpha "$2" --set florana_solver=als,gradient
    # the control: FLoRA-NA's code with its weights held at FedIT's (a 1000× smaller gradient step) must be FedIT
    rt "${PAPER[@]}" --seeds "$1" --alpha "$2" --set florana_solver=gradient --set florana_lr=0.001
    rt "${PAPER[@]}" --seeds "$1" --alpha "$2" --set florana_gauge=sum_p,balanced,client_norm,fedit_norm
    rt --methods svd --seeds "$1" --alpha "$2" --set svd_split=client_norm,balanced,b
}

case "${1:?stream a, b, c, d, e, f, g, h or p}" in
  a)
    rt --methods "$HEAD" --seeds 0 --alpha 0.5  # fedit seed 0 ran on two threads: compare reuses it as it is
    rt "${PAPER[@]}" --seeds 0 --alpha 0.5,0.1,1.0
    rt --methods "$REST" --seeds 0 --alpha 0.5
    rt --methods "$HEAD,$REST" --seeds 0 --alpha 0.1,1.0
    rt --methods centralized --seeds 0 --alpha 0.1,1.0 --set lr=0.001  # the pooled bound at its own lr (h)
    ;;
  b)
    rt --methods "$HEAD" --seeds 1,2 --alpha 0.5
    rt "${PAPER[@]}" --seeds 1,2 --alpha 0.5,0.1,1.0
    ablation 2 0.5  # FLoRA-NA never left the majority answers on seed 2 while FedIT reached 0.75: which option helps?
    for seed in 1 2 0; do privacy $seed; done
    rt --methods "$REST" --seeds 1,2 --alpha 0.5
    rt --methods "$HEAD,$REST" --seeds 1,2 --alpha 0.1,1.0
    rt --methods centralized --seeds 1,2 --alpha 0.1,1.0 --set lr=0.001  # the pooled bound at its own lr (h)
    ;;
  c)  # optional seeds ("c 0"); streams that meet the same run leave it to whichever holds it (compare skips it)
    for seed in ${2:-0 1 2}; do privacy $seed; done
    ;;
  d)
    "$FLORANA" compare --config configs/arithmetic_smollm2.toml --out "$SWEEP/arithmetic" --quiet \
        --methods fedit,florana,svd,ffa,fedsa,centralized --seeds 0,1,2
    ;;
  e)  # seed 0 of FedIT, FLoRA-NA and svd at both α first: whether seed 2's failure on Rotten Tomatoes is the task's
    ng --methods "$HEAD" --seeds 0 --alpha 0.1,1.0
    ng "${PAPER[@]}" --seeds 0 --alpha 0.1,1.0
    ng --methods "$HEAD" --seeds 1,2 --alpha 0.1,1.0  # the headline's three seeds before the other methods
    ng --methods "$HEAD,ffa,fedsa,centralized,local" --seeds 0,1,2 --alpha 0.1,1.0
    ng --methods centralized --seeds 0,1,2 --alpha 0.1,1.0 --set lr=0.001  # the pooled bound at h's lr for it too
    ng "${PAPER[@]}" --seeds 1,2 --alpha 0.1,1.0
    ;;
  f)
    for alpha in 0.5 0.1; do for seed in 2 0 1; do ablation $seed $alpha; done; done
    ;;
  g)
    rt --methods florana,fedit --seeds 0,1,2 --alpha 1.0  # the paper's estimate ended at 0.639 on seed 0, FedIT 0.771
    ng --methods florana --seeds 0 --alpha 0.1,1.0  # the default on the second task, beside its seed-0 runs there
    rt "${PAPER[@]}" --seeds 1,2 --alpha 1.0
    rt --methods svd --seeds 1,2 --alpha 1.0
    ;;
  h)
    rt --methods ffa,fedsa,centralized,local --seeds 0,1,2 --alpha 0.5
    # the pooled bound at a smaller lr: at the shared 5e-3 its 30 sequential steps a round collapse to the majority
    # answer by round 10 (seeds 0, 1); results/rotten_tomatoes_centralized_lr beside the shared lr's
    rt --methods centralized --seeds 0,1,2 --alpha 0.5 --set lr=0.001
    rt --methods "$REST" --seeds 1,2 --alpha 0.5
    ;;
  p)
    rt --methods fedit --seeds 0,1 --alpha 0.1 --set bf16=false
    rt --methods fedit --seeds 0 --alpha 1.0 --set bf16=false
    ;;
  *) echo "stream a, b, c, d, e, f, g, h or p" >&2; exit 2 ;;
esac
