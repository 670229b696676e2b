#!/usr/bin/env bash
# The project's entry points. On a fresh clone with only python3 and pip, each command installs what
# it needs (requirements.txt; requirements-dev.txt for test and bench), builds fakequant._C in place, and
# installs the checkout in editable mode, so that `python examples/...`, `python bench/...` and
# `python tools/...` then run as written from the repository root, in any shell.
#   bash run.sh demo    the main job
#   bash run.sh test    the test suite (what CI runs)
#   bash run.sh bench   the benchmark table (bench/run.py; --quick for a short run)
#   bash run.sh setup   install and build only
#   bash run.sh gpu-check   on a machine with a CUDA GPU: build for it, then tests, sanitizer, benchmarks and
#                           ResNet-50 steps into $GPU_CHECK_OUT (default gpu-check/); installs nothing, and
#                           without a GPU exits at once (status 3) saying what it needs (tools/gpu_check.py)
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

install_checkout() {  # an editable install: a .pth file in $PYTHON's site-packages finds fakequant in this checkout
  # Not `pip install -e .`: that compiles fakequant._C again in a throwaway build folder on every install, where
  # the in-place build above reuses build/ (ninja). The .pth finds only the package, as pip's editable finder does,
  # and after the entries of sys.path (PYTHONPATH, the script's folder), which keep their precedence.
  "$PYTHON" - "$PWD" <<'PYTHON' || exit 1
import os, site, subprocess, sys, sysconfig

root = os.path.realpath(sys.argv[1])
# site.py exec()s a .pth line that starts with "import"; the lambda looks up only builtins and its argument.
line = ("import sys; sys.meta_path.append(type('FakequantCheckout', (), {'find_spec': staticmethod(lambda name, "
        "path=None, target=None: __import__('importlib.machinery').machinery.PathFinder.find_spec(name, [%r]) "
        "if name == 'fakequant' else None)})())\n" % root)
folders = [sysconfig.get_paths()["purelib"]] + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
paths = [os.path.join(folder, "fakequant-checkout.pth") for folder in folders]
for path in paths:
    try:
        with open(path) as f:
            if f.read() == line:
                sys.exit(0)  # installed, from this checkout
    except OSError:
        pass
written = None
for path in paths:
    try:
        if written is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(line)
            written = path
        elif os.path.exists(path):
            os.remove(path)  # another checkout's, which would be found first
    except OSError:
        continue
if written is None:
    sys.exit(f"run.sh: cannot write fakequant-checkout.pth into {' or '.join(folders)}; "
             "install with `pip install --no-build-isolation -e .` instead")
print(f"installing this checkout for {sys.executable} (editable: {written}; rm it to undo)")
check = "import importlib.util as u; s = u.find_spec('fakequant'); print(s.origin if s else '')"
found = subprocess.run([sys.executable, "-E", "-c", check], cwd=os.path.abspath(os.sep), capture_output=True,
                       text=True).stdout.strip()
if found != os.path.join(root, "fakequant", "__init__.py"):
    sys.exit(f"run.sh: a new `import fakequant` finds {found or 'nothing'}, not this checkout; "
             "`pip uninstall fakequant` removes an installed copy")
PYTHON
}

setup() {  # setup <requirements file>
  mkdir -p "$LOGS"
  install_requirements "$1"
  build_extension
  install_checkout
}

case "${1:-}" in
  setup) setup requirements-dev.txt ;;
  demo) setup requirements.txt; "$PYTHON" examples/digits.py "${@:2}" ;;
  test) setup requirements-dev.txt; "$PYTHON" -m pytest tests "${@:2}" ;;
  bench) setup requirements-dev.txt; "$PYTHON" bench/run.py "${@:2}" ;;
  gpu-check) "$PYTHON" tools/gpu_check.py "${@:2}" ;;
  *) echo "usage: bash run.sh demo|test|bench|setup|gpu-check [args]" >&2; exit 2 ;;
esac
