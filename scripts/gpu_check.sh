#!/usr/bin/env bash
# florana on one CUDA GPU, offline, in at most 8 minutes: a 2-round run on CUDA (and its resume), flora/fedex's base
# delta on the GPU, a causal LM, float16 with a GradScaler, every aggregator on the GPU against the CPU, a causal LM in
# 4-bit (skipped, saying so, where bitsandbytes is not installed), peak GPU memory with 100 clients against 2, and the
# LLaMA-2-7B-shape FLoRA-NA aggregation. One line per check: `CHECK name: PASS|FAIL|SKIP details`.
#
# Needs python3 with torch, transformers, peft, numpy and safetensors (a bare GPU machine; no flwr, datasets,
# matplotlib, network or model files). florana runs from src/; the few pure-Python wheels it needs beyond those
# (tomli_w; bitsandbytes for the 4-bit check) come from .whl/ when that folder is there: `make gpu-wheels` fills it
# on a machine with network.
#
#   scripts/gpu_check.sh                               # on the GPU machine
#   FLORANA_GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh   # the same logic on the CPU, tiny sizes (the test suite runs it)
# Exit status: 0 when no check failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${FLORANA_GPU_CHECK_SECONDS:-480}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/florana-gpu-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
extra=""
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install --quiet --no-index --no-deps --target "$tmp/site" .whl/*.whl; then
        extra="$tmp/site"
        echo "gpu_check: wheels from .whl/: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
        echo "gpu_check: could not install the wheels in .whl/ (continuing with what is installed)"
    fi
fi
export PYTHONPATH="$PWD/src${extra:+:$extra}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HOME="$tmp/hf" TMPDIR="$tmp"
timeout "$LIMIT" "$PY" scripts/gpu_check.py "$@"
status=$?
if [ "$status" = 124 ]; then
    echo "CHECK time: FAIL the checks ran past ${LIMIT} s"
fi
exit "$status"
