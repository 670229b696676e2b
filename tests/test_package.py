"""Import-time behaviour: loading the compiled kernels, falling back, choosing a backend by environment."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python_process(
    *args: str, cwd: str | None = None, timeout: int = 300, **env: str
) -> subprocess.CompletedProcess:
    """Runs ``python *args`` with the project on the path and the fakequant switches unset unless given."""
    environment = {**os.environ, "PYTHONPATH": ROOT, **env}
    for name in ("FAKEQUANT_BACKEND", "FAKEQUANT_DISABLE_EXTENSION", "FAKEQUANT_BENCH_DEFAULT_MALLOC"):
        if name not in env:
            environment.pop(name, None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return run_python_process("-W", "default", "-c", textwrap.dedent(code), **env)


def fresh_environment() -> dict[str, str]:
    """A new shell's environment: this one without PYTHONPATH and without the fakequant switches, so that a
    command finds fakequant only the way a user's shell would (the checkout installed by ``bash run.sh setup``)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("FAKEQUANT_")}


def run_in_fresh_shell(*args: str, cwd: str = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs ``python *args`` in :func:`fresh_environment`, from the repository root unless ``cwd`` says otherwise."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=fresh_environment(), capture_output=True, text=True, timeout=timeout
    )


NOT_INSTALLED = "fakequant is not installed from this checkout: run `bash run.sh setup` (an editable install)"


def test_a_fresh_shell_anywhere_imports_this_checkout_with_its_compiled_kernels(tmp_path):
    code = "import fakequant; print(fakequant.__file__); print(fakequant.extension_loaded())"
    result = run_in_fresh_shell("-c", code, cwd=str(tmp_path))
    assert result.returncode == 0, NOT_INSTALLED + "\n" + result.stderr[-2000:]
    module_file, loaded = result.stdout.splitlines()[-2:]
    assert os.path.samefile(module_file, os.path.join(ROOT, "fakequant", "__init__.py")), NOT_INSTALLED
    assert loaded == "True", "fakequant._C does not load from the checkout: run `bash run.sh setup` (it builds it)"


def test_the_install_puts_only_the_package_on_the_path(tmp_path):
    """The checkout's other folders (bench, tests, ...) do not become importable everywhere, as they would with the
    repository root on every interpreter's path."""
    code = "import importlib.util as u; print(u.find_spec('fakequant') is not None, u.find_spec('bench') is None)"
    result = run_in_fresh_shell("-c", code, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True"], NOT_INSTALLED + "; or the install exposes the root"


CHECK_OPS_WORK = """
import torch, fakequant
x = torch.randn(100)
out = fakequant.fake_quant_per_tensor(x, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), -8, 7)
assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7))
"""


def test_disable_extension_variable_skips_loading():
    result = run_python(CHECK_OPS_WORK + """
assert not fakequant.extension_loaded()
print(fakequant.extension_error())
""", FAKEQUANT_DISABLE_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert "disabled by FAKEQUANT_DISABLE_EXTENSION" in result.stdout
    assert "RuntimeWarning" not in result.stderr


def test_missing_extension_warns_once_and_falls_back():
    result = run_python("""
import importlib.abc, sys

class BlockCompiledKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fakequant._C":
            raise ImportError("simulated: no compiled kernels")
        return None

sys.meta_path.insert(0, BlockCompiledKernels())
""" + CHECK_OPS_WORK + """
import fakequant._backend
fakequant._backend.load_extension()  # loading is attempted once: no second warning
assert not fakequant.extension_loaded()
""")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("could not be loaded (simulated: no compiled kernels)") == 1, result.stderr


def test_backend_from_environment():
    result = run_python(CHECK_OPS_WORK + "print(fakequant.get_backend())", FAKEQUANT_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"


def test_unknown_backend_in_environment_fails_clearly():
    result = run_python("import fakequant", FAKEQUANT_BACKEND="fastest")
    assert result.returncode != 0
    assert "unknown backend 'fastest'; valid backends:" in result.stderr
