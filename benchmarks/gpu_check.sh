#!/usr/bin/env bash
# The checks that need a GPU, as one short script for a session lent one (see README, "Speed"):
# the CUDA tests, then the speed benchmark on the GPU. Writes logs under ${OUT:-gpu_check}.
set -uo pipefail
out="${OUT:-gpu_check}"
mkdir -p "$out"
python3 -m pip install -q -e '.[dev]' 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest tests/test_cuda.py -q 2>&1 | tee "$out/cuda_tests.log"
python3 benchmarks/speed.py --device cuda 2>&1 | tee "$out/speed_cuda.log"
cp benchmarks/results/speed.json "$out/speed_cuda.json" 2>/dev/null || true
