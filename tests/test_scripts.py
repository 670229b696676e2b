"""The scripts run where the docs say they run: every command that the README, the docs, run.sh and the scripts
themselves show, from a new shell at the repository root (no PYTHONPATH: the checkout is installed by
``bash run.sh setup``), and the benchmark runner, the training-step benchmark and the examples end to end at tiny
settings, the same way.

The commands are read from the text, so a newly documented one is covered without a change here: ``python
<folder>/<script>.py ...`` and a script's path quoted alone (```examples/resnet50_qat.py```, as in the README's
tables) run with ``--help``; ``python -m <module>`` likewise; ``pytest <folder>/<file>.py`` collects. Every
script of those folders (a file with a ``__main__`` block) must show its ``--help`` too, documented or not.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.test_memory import IS_GLIBC
from tests.test_package import NOT_INSTALLED, ROOT, run_in_fresh_shell

SCRIPT_FOLDERS = ("examples", "bench", "tools")
_PATH = r"(?:examples|bench|tools)/\w+\.py"
PYTHON_COMMAND = re.compile(rf"\bpython3?\s+({_PATH})")
QUOTED_PATH = re.compile(rf"`({_PATH})(?:\s[^`]*)?`")
MODULE_COMMAND = re.compile(r"\bpython3?\s+-m\s+((?:examples|bench|tools)(?:\.\w+)*)")
PYTEST_COMMAND = re.compile(rf"\bpytest\s+({_PATH})")


def documents() -> list[Path]:
    """Where commands are shown: the README, the docs, run.sh and every Python file of the script folders."""
    root = Path(ROOT)
    found = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "run.sh"]
    return found + [p for folder in SCRIPT_FOLDERS for p in sorted((root / folder).glob("*.py"))]


def is_script(path: Path) -> bool:
    return path.is_file() and 'if __name__ == "__main__":' in path.read_text()


def documented_commands() -> dict[str, dict[str, str]]:
    """``{"script": {path: where}, "module": {...}, "pytest": {...}}``, each with the first place that shows it."""
    commands: dict[str, dict[str, str]] = {"script": {}, "module": {}, "pytest": {}}
    for document in documents():
        for number, line in enumerate(document.read_text().splitlines(), 1):
            where = f"{Path(document).relative_to(ROOT)}:{number}"
            scripts = PYTHON_COMMAND.findall(line)
            scripts += [p for p in QUOTED_PATH.findall(line) if is_script(Path(ROOT, p))]  # else a file, not a command
            for kind, found in (("script", scripts), ("module", MODULE_COMMAND.findall(line)),
                                ("pytest", PYTEST_COMMAND.findall(line))):  # fmt: skip
                for command in found:
                    commands[kind].setdefault(command, where)
    for folder in SCRIPT_FOLDERS:
        for path in sorted(Path(ROOT, folder).glob("*.py")):
            if is_script(path):
                commands["script"].setdefault(str(path.relative_to(ROOT)), "a script, documented nowhere")
    return commands


COMMANDS = documented_commands()


def run_script(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` from a new shell at the repository root, as the docs show it."""
    result = run_in_fresh_shell(*args, timeout=600)
    if "No module named 'fakequant'" in result.stderr:
        pytest.fail(f"python {' '.join(args)}: {NOT_INSTALLED}")
    return result


def test_the_documented_commands_are_found():
    expected = {"examples/resnet50_qat.py", "examples/digits.py", "bench/run.py", "bench/bench_qat_step.py",
                "bench/readme_plot.py", "tools/gpu_check.py", "tools/kernel_smoke.py"}  # fmt: skip
    assert expected <= set(COMMANDS["script"])
    assert COMMANDS["script"]["examples/resnet50_qat.py"].startswith("README.md:")  # quoted in the speed table
    assert "bench" in COMMANDS["module"] and "bench/bench_qat_step.py" in COMMANDS["pytest"]


@pytest.mark.parametrize("script", sorted(COMMANDS["script"]))
def test_a_documented_script_shows_its_help_from_a_new_shell(script):
    where = COMMANDS["script"][script]
    assert Path(ROOT, script).is_file(), f"{where} shows {script}, which does not exist"
    result = run_script(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout, f"{where}: python {script} --help\n{result.stderr}"


@pytest.mark.parametrize("module", sorted(COMMANDS["module"]))
def test_a_documented_module_shows_its_help_from_a_new_shell(module):
    result = run_script("-m", module, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout, (
        f"{COMMANDS['module'][module]}: python -m {module} --help\n{result.stderr}"
    )


def test_the_documented_pytest_files_collect_from_a_new_shell():
    files = sorted(COMMANDS["pytest"])
    result = run_script("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for path in files:
        assert f"{path}::" in result.stdout, f"{COMMANDS['pytest'][path]}: pytest {path} collects no test"


def test_bench_run_interleaved_runs_what_k_selects(tmp_path):
    result = run_script(
        "bench/run.py", "--quick", "--interleaved", "--ops", "binarize", "--providers", "fakequant", "copy",
        "-k", "2_18 and not fwd+bwd", "--rounds", "1", "--out", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (json_path,) = tmp_path.glob("*-quick.json")
    names = sorted(entry["name"] for entry in json.loads(json_path.read_text())["benchmarks"])
    assert names == [
        "binarize[2_18-copy-alloc-copy]", "binarize[2_18-copy-copy]",
        "binarize[2_18-fakequant-fwd+mask]", "binarize[2_18-fakequant-fwd]",
    ]
    meta = json.loads(json_path.with_suffix(".meta.json").read_text())
    assert meta["freed_memory_retained"] is IS_GLIBC
    assert json_path.with_suffix(".csv").exists() and json_path.with_suffix(".png").exists()


def test_bench_run_says_when_nothing_matched(tmp_path):
    for mode in ([], ["--interleaved"]):
        result = run_script(
            "bench/run.py", "--quick", *mode, "--ops", "binarize", "-k", "no_such_case", "--out", str(tmp_path)
        )
        assert result.returncode != 0
        assert "no benchmark" in result.stderr and "no_such_case" in result.stderr, result.stderr[-2000:]


def test_bench_targets_of_a_pytest_benchmark_run_say_where_targets_are_read():
    from bench import report

    row = {"op": "per_tensor", "mode": "fwd", "provider": "fakequant", "size": report.TARGET_SIZE, "x_copy": 1.5}
    interleaved = report.format_targets([row], "interleaved, 10 rounds")
    assert "MISSED" in interleaved and report.PYTEST_BENCHMARK_TARGETS_CAVEAT not in interleaved
    assert report.format_targets([row], "pytest-benchmark").endswith(report.PYTEST_BENCHMARK_TARGETS_CAVEAT)


def test_bench_qat_step_interleaved_table():
    result = run_script("bench/bench_qat_step.py", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"freed memory retained: {IS_GLIBC}" in result.stdout
    rows = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert rows == ["fp32", "qat", "qat-reference", "qat-nofold", "qat-fold-frozen", "qat-nni"], result.stdout
    assert "nni: 3.0" in result.stdout


def test_resnet50_example_trains_reports_and_exports(tmp_path):
    result = run_script(
        "examples/resnet50_qat.py", "--image-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0",
        "--export-dir", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("freed memory retained" in result.stdout) is IS_GLIBC
    assert "53 Conv+BN pairs folded" in result.stdout
    for configuration in ("FP32", "QAT (fakequant)", "QAT (reference)"):
        assert configuration in result.stdout
    calibration = torch.load(tmp_path / "resnet50_qat_calibration.pth")
    assert len(calibration) == 54
    state = torch.load(tmp_path / "resnet50_qat.pth")
    assert not any("fakequant_" in key for key in state)


def test_run_sh_with_nothing_to_install_or_build_prints_nothing():
    def setup() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "run.sh", "setup"], cwd=ROOT, capture_output=True, text=True, timeout=1800)

    first = setup()  # whatever this one had to do, the next has nothing left
    assert first.returncode == 0, first.stderr[-3000:]
    second = setup()
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout == "" and second.stderr == ""


def test_digits_demo_times_every_method_in_turn():
    result = run_script("examples/digits.py", "--epochs", "2", "--batch-size", "256")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "methods took their steps in turn" in result.stdout
    lines = result.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("method"))) + 2 :]
    assert [line.split()[0] for line in table] == ["FP32", "Naive", "QAT", "DoReFa", "DoReFa", "FP32", "BNN"]
    assert table[0].endswith("1.00x") and "no training" in table[1]
