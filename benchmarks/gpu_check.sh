#!/usr/bin/env bash
# The GPU check, one command from the repository root (benchmarks/gpu_check.py says what it measures):
#   bash benchmarks/gpu_check.sh OUT_DIR [--sections env,tests,...]   # on a GPU machine: ≤ 420 s on an H100/H200
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR                    # anywhere: every section tiny, on the CPU
# It needs only what the lent GPU machines hold (torch, triton, accelerate, safetensors, tiktoken, numpy, pyarrow,
# matplotlib, pytest): no network, no pip install, no carried folder. Results: OUT_DIR/gpu-check.{json,md,log}.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
out="${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUT_DIR [--sections LIST]}"
shift
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 benchmarks/gpu_check.py "$out" "${dry[@]}" "$@" 2>&1 | tee "$out/gpu-check.log"
exit "${PIPESTATUS[0]}"
