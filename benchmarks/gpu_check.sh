#!/usr/bin/env bash
# The checks that need a GPU, as one short script for a session lent one (under 8 minutes):
# the CUDA tests, training images/s (fp32, bf16; batch 64), inference images/s (batch 1, 16, 64),
# peak GPU memory, a 2-process DDP run (both on one GPU when only one is there), and the demo fitted
# in float32 and in bf16 with the seconds of each phase.
# Everything lands in one JSON file, ${OUT:-gpu_check}/gpu_check.json, with a log beside it.
# benchmarks/gpu_check.py says what each part measures; `python benchmarks/gpu_check.py --cpu`
# is its dry run on the CPU. Extra arguments go to gpu_check.py (e.g. --skip ddp).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
mkdir -p "$out"
# The package is checked as it is in this checkout (first on the path, ahead of any install). A GPU
# machine often has torch and no way to fetch packages, so pip runs only if that does not import.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import prn.train" 2>/dev/null || python3 -m pip install -q -e '.[dev]' 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.txt" 2>&1
# the parts carry their own time limits; this one bounds the whole (8 minutes less the install)
timeout 450 python3 benchmarks/gpu_check.py --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
