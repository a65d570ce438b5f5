#!/usr/bin/env bash
# One call on a GPU machine (torch, Triton, nvcc; no network, nothing installed): build the extension,
# run the GPU tests, measure the ceilings, profile three real MoE layers with every backend, and print
# a short table last. Full results (JSON, logs) go to the folder given as $1 (default: $OUT, else
# benchmarks/results/gpu-<date>). Not run on a GPU yet, so its duration is unmeasured; the step
# timeouts bound it, so that a machine lent for 10 minutes a call runs it in two parts: PART=1 (build,
# GPU tests, ceilings, quantized experts: 120 + 270 + 60 + 150 = 600 s at most) and PART=2 (build,
# ceilings, the three layers' profiles: 120 + 60 + 3 × (80 + 60) = 600 s at most), each followed by
# the untimed summary. A failing timed step is reported, the later steps still run, and the script
# then exits 1.
#
#   [PART=1|2] bash benchmarks/gpu_check.sh [RESULTS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-benchmarks/results/gpu-$(date +%F)}}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MOECAP_CACHE_DIR=${MOECAP_CACHE_DIR:-/tmp/moecap-cache}
PY=${PYTHON:-python3}
PART=${PART:-all}
status=0
part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
step() { echo; echo "== $1"; }
# run LIMIT CMD...: CMD under a timeout; on failure say so, set status=1 and return 1. In a pipeline
# (`run … | tee`) run is in a subshell whose status=1 is lost: pipefail hands its 1 on, so check it.
run() { local limit=$1; shift; timeout "$limit" "$@" || { echo "!! failed ($?): $*"; status=1; return 1; }; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build the extension (CUDA flavour)"
run 120 $PY -m moecap_kernels._ext

if part 1; then
  step "GPU tests"
  run 270 $PY -m pytest -q -x tests/test_gpu.py 2>&1 | tee "$RESULTS/gpu_tests.log" || status=1
fi

step "ceilings: read/copy bandwidth and GEMM peaks, measured"
run 60 $PY benchmarks/gpu_summary.py calibrate --json "$RESULTS/ceilings.json"

if part 1; then
  step "quantized experts: every format through triton (and the dequantize-then-GEMM baseline)"
  run 150 $PY -m moecap_kernels.profile --model mixtral-8x7b --phase decode --batch 1,8,64 \
    --quant none,int8,w8a8,int4-g128,int4-g128-zp,fp8-channel,fp8-block,mxfp4 --backend triton,dequant \
    --warmup 5 --reps 40 --json "$RESULTS/mixtral-8x7b-quant.json"
fi

if part 2; then
  step "profiles"
  for model in mixtral-8x7b qwen3-30b-a3b deepseek-v3; do
    run 80 $PY -m moecap_kernels.profile --model "$model" --phase decode --batch 1,8,64,256 \
      --backend triton,grouped,loop --warmup 5 --reps 40 --json "$RESULTS/$model-decode.json"
    run 60 $PY -m moecap_kernels.profile --model "$model" --phase prefill --batch 1 --seq-len 4096 \
      --backend triton,grouped,loop --warmup 3 --reps 15 --json "$RESULTS/$model-prefill.json"
  done
fi

step "summary"
shopt -s nullglob
$PY benchmarks/gpu_summary.py table "$RESULTS"/*-decode.json "$RESULTS"/*-prefill.json "$RESULTS"/*-quant.json \
  --ceilings "$RESULTS/ceilings.json" --markdown "$RESULTS/summary.md"
exit $status
