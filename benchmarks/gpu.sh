#!/usr/bin/env bash
# The GPU path in one run: the CUDA tests (every measure and optimizer equals its CPU value), then
# the cost benchmarks with --device cuda. Run from the repository root on a machine with a GPU:
#
#     bash benchmarks/gpu.sh [OUT]        # OUT defaults to benchmarks/results/gpu
#
# Writes OUT/gpu_env.txt (GPU, driver, torch), OUT/gpu_tests.log and one JSON per benchmark
# (sharpness_cost, modern_attention_cost, optim_step, real_size; CUDA wall times between
# synchronisations, the allocator's peak memory). Each step has its own time limit, so one hang
# does not lose the others.
set -uo pipefail
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/gpu_env.txt"

step() {  # step SECONDS NAME COMMAND...: run with a limit, log, and say how it ended
    local limit=$1 name=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/gpu_env.txt"
    tail -n 15 "$OUT/$name.log"
}

step 150 gpu_tests python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    "tests/test_quotient_and_adapters.py::test_operations_keep_device_and_dtype"
step 75 sharpness_cost python benchmarks/sharpness_cost.py --device cuda --out "$OUT/sharpness_cost_cuda.json"
step 75 modern_attention_cost python benchmarks/modern_attention_cost.py --device cuda \
    --out "$OUT/modern_attention_cost_cuda.json"
step 90 optim_step python benchmarks/optim_step.py --device cuda --out "$OUT/optim_step_cuda.json"
step 150 real_size python benchmarks/real_size.py --device cuda --repeats 3 --out "$OUT/real_size_cuda.json"
