#!/usr/bin/env bash
# Everything the native engine's GPU path needs checked and measured, in one run on a GPU
# machine (the device tool's H100/H200: its python3 already has torch, Triton, transformers):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # from the repo root; est. 6-8 minutes (not yet run)
#
# 1. the CUDA tests: the compiled kernel against the torch reference, and the engine with and
#    without CUDA graphs token-exact against transformers;
# 2. issue 4's benchmark: bf16, 128 concurrent requests, 128 in / 128 out, native vs HF
#    generate in the same run, for the SmolLM2-135M shape and a 1.2B Llama shape;
# 3. ablations on the 1.2B shape: without CUDA graphs, and with the torch gather attention;
# 4. a profile of the 1.2B run: the top GPU ops by self time.
# Logs and JSON results go to OUT_DIR (default $OUT, else /tmp/gpu-check).
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$OUT_DIR"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

step CUDA tests
$PY -m pytest -q -p no:cacheprovider tests/test_paged_attention.py tests/test_native_gpu.py \
    2>&1 | tee "$OUT_DIR/tests.log" | tail -n 25

bench() {  # name, then offline.py arguments
    local name=$1; shift
    step "offline $name: $*"
    $PY benchmarks/offline.py --dtype bf16 --num-prompts 128 --input-len 128 --output-len 128 \
        --json "$OUT_DIR/offline-$name.json" "$@" 2>&1 | grep -v Warning | tee -a "$OUT_DIR/bench.log"
}
bench smollm2 --random-config smollm2
bench llama-1b --random-config llama-1b
bench llama-1b-eager --random-config llama-1b --skip-hf --enforce-eager
bench llama-1b-torch-attn --random-config llama-1b --skip-hf --attention-backend torch
bench llama-1b-profile --random-config llama-1b --skip-hf --profile 25
echo; echo "done: $OUT_DIR"
