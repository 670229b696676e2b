"""The GPU validation kit (tools/gpu_check.py, tools/kernel_smoke.py) on a machine without a GPU.

What a GPU run does cannot run here; what it calls can: the kit's rehearsal runs every step on the CPU at tiny
sizes (the kernel smoke run against the reference, the pytest commands collecting, the benchmark and the
ResNet-50 steps in fp32 and under bf16 autocast) and writes the same summary. The kernel smoke script runs the
C++ kernels in full.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from tests import test_package
from tests.test_package import run_python_process
from tools import gpu_check, kernel_smoke

ROOT = Path(test_package.ROOT)


def _without_gpu() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_without_a_gpu_the_command_exits_at_once_saying_what_it_needs():
    import subprocess

    result = subprocess.run(
        ["bash", "run.sh", "gpu-check"], cwd=ROOT, env=_without_gpu(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == gpu_check.NO_GPU_STATUS, result.stderr[-2000:]
    assert "gpu-check needs a CUDA GPU" in result.stderr
    assert "torch.cuda.is_available() is False" in result.stderr
    assert "installs nothing" in result.stderr
    assert "Requirement already satisfied" not in result.stdout + result.stderr  # no pip, no build
    assert not (ROOT / "gpu-check").exists()


def test_setup_and_kit_agree_on_the_default_architectures():
    setup_text = (ROOT / "setup.py").read_text()
    assert f'DEFAULT_CUDA_ARCH_LIST = "{gpu_check.SETUP_DEFAULT_ARCH_LIST}"' in setup_text
    assert gpu_check.arch_list((9, 0)) == gpu_check.SETUP_DEFAULT_ARCH_LIST
    assert gpu_check.arch_list((8, 0)) == gpu_check.SETUP_DEFAULT_ARCH_LIST
    assert gpu_check.arch_list((10, 0)) == gpu_check.SETUP_DEFAULT_ARCH_LIST + ";10.0"


def test_gpu_plan_holds_every_step_in_order(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    steps = gpu_check.plan(tmp_path, rehearse=False)
    assert [s.name for s in steps] == [
        "build", "smoke-cuda", "smoke-triton", "tests-cuda", "compile", "memcheck", "tests-triton",
        "bench-fp32", "resnet50", "bench-lsq-fp32", "bench-bf16",
    ]  # fmt: skip
    by_name = {s.name: s for s in steps}
    for name, targets in gpu_check.TEST_TARGETS.items():  # the one place that names the tests each step runs
        assert by_name[name].argv[1:3 + len(targets)] == ["-m", "pytest", *targets]
        paths = [t for i, t in enumerate(targets) if not t.startswith("-") and (i == 0 or targets[i - 1] != "-k")]
        assert paths and all((gpu_check.ROOT / path).exists() for path in paths), (name, paths)
    assert by_name["tests-triton"].env["FAKEQUANT_BACKEND"] == "triton"
    assert by_name["memcheck"].argv[1:5] == ["--tool", "memcheck", "--error-exitcode", "1"]
    bench = by_name["bench-fp32"].argv
    assert bench[bench.index("--sizes") + 1 : bench.index("--sizes") + 5] == ["20", "22", "24", "26"]
    resnet = by_name["resnet50"].argv
    assert resnet[resnet.index("--batch-size") + 1] == "64" and resnet[resnet.index("--image-size") + 1] == "224"
    assert {"cuda", "triton"} <= set(resnet) and "bf16" in resnet
    # Every step together fits the budget's worst case of a rerun: the timeouts bound it, the budget cuts it.
    assert sum(s.timeout_s for s in steps) > gpu_check.DEFAULT_BUDGET_S


def test_a_step_that_no_longer_fits_the_budget_is_recorded_as_not_run(tmp_path):
    step = gpu_check.Step("slow", "a step", ["python3", "-c", "print(1)"], timeout_s=100)
    gpu_check.run_step(step, tmp_path, 1, remaining_s=5)
    assert step.status == "not run" and "budget" in step.detail


def test_a_step_past_its_time_limit_times_out_ends_its_children_and_keeps_its_log(tmp_path):
    (tmp_path / "logs").mkdir()
    marker = tmp_path / "child-survived"
    child = f"import time; time.sleep(30); open({str(marker)!r}, 'w').close()"
    script = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "print('started', flush=True); time.sleep(60)")  # fmt: skip
    step = gpu_check.Step("sleeper", "sleeps", ["python3", "-c", script], timeout_s=16)
    gpu_check.run_step(step, tmp_path, 1, remaining_s=100)
    assert step.status.startswith("TIMED OUT") and step.seconds < 40
    assert "started" in step.log.read_text()
    import time

    time.sleep(16)  # the grandchild would have written the marker 30 s after it started
    assert not marker.exists()


def test_junit_counts_and_failures(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a"/>'
        '<testcase classname="tests.test_x" name="test_b"><failure message="assert 1 == 2&#10;more"/></testcase>'
        '<testcase classname="tests.test_x" name="test_c"><skipped message="no CUDA device"/></testcase>'
        '<testcase classname="tests.test_x" name="test_d"/>'
        "</testsuite></testsuites>"
    )
    assert gpu_check.junit_counts(path) == "2 passed, 1 failed, 0 errors, 1 skipped"
    assert gpu_check.junit_failures(path) == ["tests.test_x::test_b: assert 1 == 2"]
    assert gpu_check.skip_reasons(path) == ["1 x no CUDA device"]


def test_gpu_targets_say_met_missed_or_defect():
    from bench import report

    rows = [
        {"op": "per_tensor", "mode": "fwd", "size": "2^24", "provider": "fakequant-cuda", "kind": "flat",
         "numel": 1 << 24, "copy_bw_fraction": fraction, "device": "cuda"}
        for fraction in (0.95, 0.87, 0.5)
    ]  # fmt: skip
    small = {**rows[0], "numel": 1 << 22, "size": "2^22"}
    text = report.format_targets([*rows, small])
    verdicts = [line.rsplit(": ", 1)[-1] for line in text.splitlines()[1:]]
    assert verdicts == ["met", "MISSED", "DEFECT"]  # 2^22 is below the targets' sizes


def test_kernel_smoke_compare_catches_wrong_values_signs_and_nans():
    want = (torch.tensor([1.0, 0.0, float("nan")]), torch.tensor([True, False, False]))
    assert kernel_smoke.compare("fake_quant_per_tensor", want, want) is None
    wrong_value = (torch.tensor([1.5, 0.0, float("nan")]), want[1])
    wrong_sign = (torch.tensor([1.0, -0.0, float("nan")]), want[1])
    wrong_nan = (torch.tensor([1.0, 0.0, 0.0]), want[1])
    wrong_mask = (want[0], torch.tensor([True, True, False]))
    for got in (wrong_value, wrong_sign, wrong_nan, wrong_mask):
        assert kernel_smoke.compare("fake_quant_per_tensor", got, want) is not None


def test_kernel_smoke_reaches_every_op():
    names = {name for _, name, _ in kernel_smoke.cases("cpu", torch.Generator().manual_seed(0))}
    from fakequant import ops

    assert names == set(ops.op_names())


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_writes_the_summary(tmp_path):
    exported = tmp_path / "exported"
    result = run_python_process(
        "tools/gpu_check.py", "--rehearse", "--out", str(tmp_path), "--export", str(exported), cwd=str(ROOT),
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    statuses = {s["name"]: s["status"] for s in json.loads((tmp_path / "status.json").read_text())}
    assert statuses.pop("memcheck") == "not run"
    assert len(statuses) == 8 and set(statuses.values()) == {"passed"}, statuses  # no build, one smoke run
    for name in statuses:
        assert f"| {name} | " in summary
    assert "kernel smoke: " in summary and ", 0 failed" in summary
    assert re.search(r"\d+ tests? collected", summary)  # the pytest steps' commands and paths are right
    assert "### Op benchmark, float32" in summary and "### Op benchmark, bfloat16" in summary
    rows = json.loads((tmp_path / "resnet50.json").read_text())["rows"]
    assert {r["configuration"] for r in rows} == {"FP32", "QAT (fakequant)", "FP32 bf16", "QAT (fakequant) bf16"}
    assert list((tmp_path / "bench").glob("*-bfloat16.csv")) and list((tmp_path / "bench").glob("*.png"))
    assert sorted(p.name for p in exported.iterdir()) == ["gpu-check.tar.gz", "status.json", "summary.md"]
    import tarfile

    with tarfile.open(exported / "gpu-check.tar.gz") as archive:
        names = archive.getnames()
    assert "gpu-check/summary.md" in names and any(n.startswith("gpu-check/logs/") for n in names)
    assert not any("exported" in n or "resnet50-export" in n for n in names)
