#!/usr/bin/env bash
# Everything one device call checks and measures, in one go (device time is scarce; a start costs minutes):
# the GPU-marked tests, then the kernel benchmark (W5). Logs and JSON results go to $OUT.
#   device run: bash benchmarks/run_on_gpu.sh        (carry .whl if the machine lacks pytest)
set -uo pipefail
OUT=${OUT:-/tmp/fastllm-gpu-out}
mkdir -p "$OUT"
if ! python3 -c "import pytest" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
python3 -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" ${PYTEST_ARGS:-} \
    > "$OUT/gpu-tests.log" 2>&1
tests_rc=$?
tail -n 25 "$OUT/gpu-tests.log"
python3 benchmarks/bench_kernels.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
