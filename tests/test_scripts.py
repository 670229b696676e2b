"""The benchmark runner, the training-step benchmark and the ResNet-50 example run end to end (tiny settings)."""

from __future__ import annotations

import json
import subprocess

import torch

from tests.test_memory import IS_GLIBC
from tests.test_package import ROOT, run_python_process


def run_script(*args: str) -> subprocess.CompletedProcess:
    return run_python_process(*args, cwd=ROOT, timeout=600)


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
    from bench import run

    row = {"op": "per_tensor", "mode": "fwd", "provider": "fakequant", "size": run.TARGET_SIZE, "x_copy": 1.5}
    interleaved = run.format_targets([row], "interleaved, 10 rounds")
    assert "MISSED" in interleaved and run.PYTEST_BENCHMARK_TARGETS_CAVEAT not in interleaved
    assert run.format_targets([row], "pytest-benchmark").endswith(run.PYTEST_BENCHMARK_TARGETS_CAVEAT)


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
