#!/usr/bin/env bash
# The project's entry points. On a fresh clone with only python3 and pip, each command installs what
# it needs (requirements.txt; requirements-dev.txt for test and bench), then builds fakequant._C in place.
#   bash run.sh demo    the main job
#   bash run.sh test    the test suite (what CI runs)
#   bash run.sh bench   the benchmark table (bench/run.py; --quick for a short run)
#   bash run.sh setup   install and build only
#   bash run.sh gpu-check   on a machine with a CUDA GPU: build for it, then tests, sanitizer, benchmarks and
#                           ResNet-50 steps into $GPU_CHECK_OUT (default gpu-check/); installs nothing, and
#                           without a GPU exits at once (status 3) saying what it needs (bench/gpu_check.py)
# Each stage prints one line and keeps its full output in build/*.log; a run with nothing to install or build
# prints nothing about either.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
LOGS=build

fail() {  # fail <log> <what>
  tail -n 30 "$1" >&2
  echo "run.sh: $2 failed; the full log is $1" >&2
  exit 1
}

install_requirements() {  # install_requirements <file>: pip, unless this file's lines and interpreter are done
  local file=$1 stamp="$LOGS/.installed-$1" fingerprint
  fingerprint="$("$PYTHON" -c 'import sys; print(sys.executable)') $(cat requirements*.txt | cksum)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ] \
    && "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("torch"))'; then
    return
  fi
  echo "installing $file (log: $LOGS/pip.log)"
  "$PYTHON" -m pip install -r "$file" > "$LOGS/pip.log" 2>&1 || fail "$LOGS/pip.log" "pip install -r $file"
  echo "$fingerprint" > "$stamp"
}

build_extension() {  # ninja in build/ rebuilds only what changed; skipped when no source is newer than _C
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  local library
  library=$(ls fakequant/_C*.so 2>/dev/null | head -n 1 || true)
  if [ -n "$library" ] && [ -z "$(find csrc setup.py -newer "$library" -print -quit)" ]; then
    return
  fi
  echo "building fakequant._C (a few minutes the first time; log: $LOGS/build.log)"
  MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 \
    || fail "$LOGS/build.log" "building fakequant._C"
  touch fakequant/_C*.so  # ninja leaves an up-to-date library untouched; the check above compares with it
}

setup() {  # setup <requirements file>
  mkdir -p "$LOGS"
  install_requirements "$1"
  build_extension
}

case "${1:-}" in
  setup) setup requirements-dev.txt ;;
  demo) setup requirements.txt; "$PYTHON" examples/digits.py "${@:2}" ;;
  test) setup requirements-dev.txt; "$PYTHON" -m pytest tests "${@:2}" ;;
  bench) setup requirements-dev.txt; "$PYTHON" bench/run.py "${@:2}" ;;
  gpu-check) "$PYTHON" bench/gpu_check.py "${@:2}" ;;
  *) echo "usage: bash run.sh demo|test|bench|setup|gpu-check [args]" >&2; exit 2 ;;
esac
