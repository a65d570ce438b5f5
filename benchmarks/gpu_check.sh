#!/usr/bin/env bash
# The GPU check, in two commands that each fit one call of a lent GPU machine (at most 8 minutes and
# 7 returned files): every step runs under `timeout`, and the step limits of a part add up to less than
# 8 minutes by construction (printed at the start). A failing step is reported and the later steps
# still run (no `pytest -x`); the script then exits 1. A short table comes last.
#
#   PART=1 bash benchmarks/gpu_check.sh [RESULTS_DIR]   build, GPU tests, ceilings, formats, audit
#   PART=2 bash benchmarks/gpu_check.sh [RESULTS_DIR]   build, ceilings, three layers' profiles
#
# Files (RESULTS_DIR, default $OUT, else benchmarks/results/gpu-<date>):
#   PART=1: gpu_tests.xml ceilings.json quant.json audit.json summary-1.md        (5)
#   PART=2: mixtral-8x7b.json qwen3-30b-a3b.json deepseek-v3.json summary-2.md   (4; the ceilings
#           it measures stay in a temporary folder)
# Decode and prefill of one layer go to one JSON (two profile runs merged), so that each part stays
# within 7 files. Offloading has no GPU tier yet (disk only, refused on CUDA): nothing to check there.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-benchmarks/results/gpu-$(date +%F)}}
mkdir -p "$RESULTS"
SCRATCH=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MOECAP_NO_ENERGY=${MOECAP_NO_ENERGY:-0}
export MOECAP_CACHE_DIR=${MOECAP_CACHE_DIR:-/tmp/moecap-cache} TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
PART=${PART:-1}
status=0
step() { echo; echo "== $1"; }
# run LIMIT CMD...: CMD under a timeout; on failure say so and set status=1. DRY=1 only lists the steps
# (tests/test_gpu_check.py reads that list: every step bounded, at most 7 result files).
run() {
  local limit=$1; shift
  if [ -n "${DRY:-}" ]; then echo "DRY $limit $*"; return 0; fi
  timeout --kill-after=5 "$limit" "$@" || { echo "!! failed ($?): $*"; status=1; }
}
# Every step's limit (seconds), in the order the steps run; each may add 5 s to be killed. The worst
# case, sum + 5 per step, is checked against 470 s before anything runs.
if [ "$PART" = 1 ]; then
  L_MACHINE=10 L_BUILD=80 L_TESTS=160 L_CEIL=35 L_QUANT=75 L_AUDIT=60 L_SUMMARY=15
  LIMITS=($L_MACHINE $L_BUILD $L_TESTS $L_CEIL $L_QUANT $L_AUDIT $L_SUMMARY)
else
  L_MACHINE=10 L_BUILD=80 L_CEIL=35 L_DECODE=45 L_PREFILL=30 L_MERGE=10 L_SUMMARY=15
  LIMITS=($L_MACHINE $L_BUILD $L_CEIL $L_DECODE $L_PREFILL $L_MERGE $L_DECODE $L_PREFILL $L_MERGE \
          $L_DECODE $L_PREFILL $L_MERGE $L_SUMMARY)
fi
WORST=$(( $(IFS=+; echo "${LIMITS[*]}") + 5 * ${#LIMITS[@]} ))
echo "gpu_check part $PART: ${#LIMITS[@]} steps, at most $WORST s; results in $RESULTS"
[ "$WORST" -le 470 ] || { echo "!! part $PART could take $WORST s > 470 s"; exit 2; }

step "machine"
run $L_MACHINE nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader
step "build the extension (CUDA flavour; CuPy/NVRTC is the fallback)"
run $L_BUILD $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__); from moecap_kernels import _ext, cupy_kernels; _ext.main(); print('cupy:', cupy_kernels.status())"

if [ "$PART" = 1 ]; then
  step "GPU tests (every test runs; failures are listed, not stopping the rest)"
  run $L_TESTS $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -o addopts="" -rf \
    --junit-xml="$RESULTS/gpu_tests.xml"
  step "ceilings: read/copy bandwidth and GEMM peaks, measured"
  run $L_CEIL $PY benchmarks/gpu_summary.py calibrate --json "$RESULTS/ceilings.json"
  step "quantized experts: every format through triton, beside the dequantize-then-GEMM baseline"
  run $L_QUANT $PY -m moecap_kernels.profile --model mixtral-8x7b --batch 1,8,64 --no-accuracy \
    --quant none,int8,w8a8,int4-g128,fp8-block,mxfp4 --backend triton,dequant --warmup 5 --reps 30 \
    --json "$RESULTS/quant.json"
  step "hardware-counter audit: DRAM bytes under ncu beside the counted bytes (decode T <= 8)"
  run $L_AUDIT $PY -m moecap_kernels.profile --model mixtral-8x7b --batch 1,8 --backend triton,grouped \
    --no-accuracy --warmup 3 --reps 10 --audit --json "$RESULTS/audit.json"
  step "summary"
  run $L_SUMMARY $PY benchmarks/gpu_summary.py table "$RESULTS/quant.json" "$RESULTS/audit.json" \
    --ceilings "$RESULTS/ceilings.json" --markdown "$RESULTS/summary-1.md"
else
  step "ceilings (kept out of the returned files)"
  run $L_CEIL $PY benchmarks/gpu_summary.py calibrate --json "$SCRATCH/ceilings.json"
  for model in mixtral-8x7b qwen3-30b-a3b deepseek-v3; do
    step "$model: decode T = 1, 8, 64, 256 and prefill 4096, triton (graph replays) / grouped / loop"
    run $L_DECODE $PY -m moecap_kernels.profile --model "$model" --batch 1,8,64,256 --backend triton,grouped,loop --quant none \
      --warmup 5 --reps 20 --json "$SCRATCH/$model-decode.json"
    run $L_PREFILL $PY -m moecap_kernels.profile --model "$model" --phase prefill --batch 1 --seq-len 4096 --quant none \
      --backend triton,grouped,loop --warmup 2 --reps 10 --no-accuracy --json "$SCRATCH/$model-prefill.json"
    run $L_MERGE $PY benchmarks/gpu_summary.py merge "$SCRATCH/$model-decode.json" "$SCRATCH/$model-prefill.json" \
      --json "$RESULTS/$model.json"
  done
  step "summary"
  run $L_SUMMARY $PY benchmarks/gpu_summary.py table "$RESULTS"/mixtral-8x7b.json "$RESULTS"/qwen3-30b-a3b.json \
    "$RESULTS"/deepseek-v3.json --ceilings "$SCRATCH/ceilings.json" --markdown "$RESULTS/summary-2.md"
fi
rm -rf "$SCRATCH"
exit $status
