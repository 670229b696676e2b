#!/usr/bin/env bash
# The project's entry points. On a fresh clone with only python3 and pip, each command installs what
# it needs (requirements.txt, then an incremental build of fakequant._C) before it runs.
#   bash run.sh demo    the main job
#   bash run.sh test    the test suite (what CI runs)
#   bash run.sh bench   the benchmark table (bench/run.py; --quick for a short run)
#   bash run.sh setup   install and build only
#   bash run.sh gpu-check   on a machine with a CUDA GPU: build for it, then tests, sanitizer, benchmarks and
#                           ResNet-50 steps into $GPU_CHECK_OUT (default gpu-check/); installs nothing, and
#                           without a GPU exits at once (status 3) saying what it needs (bench/gpu_check.py)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}

setup() {
  "$PYTHON" -m pip install -q -r requirements.txt
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  # ninja rebuilds only what changed since the last build in build/.
  MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" setup.py -q build_ext --inplace
}

case "${1:-}" in
  setup) setup ;;
  demo) setup; "$PYTHON" examples/digits.py "${@:2}" ;;
  test) setup; "$PYTHON" -m pytest tests "${@:2}" ;;
  bench) setup; "$PYTHON" bench/run.py "${@:2}" ;;
  gpu-check) "$PYTHON" bench/gpu_check.py "${@:2}" ;;
  *) echo "usage: bash run.sh demo|test|bench|setup|gpu-check [args]" >&2; exit 2 ;;
esac
