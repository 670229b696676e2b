"""The GPU validation kit: one command that proves every GPU path of fakequant on the GPU it finds.

    bash run.sh gpu-check                 # what to run on a machine with an NVIDIA GPU (installs nothing)
    python tools/gpu_check.py --out DIR --budget 450
    python tools/gpu_check.py --rehearse --out DIR   # every step on the CPU at tiny sizes (what the tests run)
    GPU_CHECK_OUT=/tmp/gpu-check bash run.sh gpu-check --export "$OUT"   # on a lent machine: 3 files come back

Steps, cheapest and most telling first, each a subprocess with its own log under ``<out>/logs/`` and a time limit;
the whole run stays inside ``--budget`` seconds (default 450: the kit is meant to leave half of a 15-minute GPU
loan for one rerun), and a step that no longer fits is recorded as not run:

1. ``build``: ``fakequant._C`` for this GPU (``setup.py build_ext --inplace``, every core).
2. ``smoke-cuda``, ``smoke-triton``: every op once on tiny CUDA tensors with each backend, against the reference
   (``tools/kernel_smoke.py``).
3. ``tests-cuda``: the CUDA kernels against the reference on CUDA tensors (pytest, ``TEST_TARGETS``), junit XML.
4. ``compile``: ``torch.compile(fullgraph=True)`` of a training step calling every op, on CUDA tensors, with the
   CUDA, Triton and reference backends (pytest, ``TEST_TARGETS``), junit XML.
5. ``memcheck``: ``compute-sanitizer --tool memcheck`` over ``kernel_smoke.py`` (every CUDA kernel, tiny sizes).
6. ``tests-triton``: the Triton kernels (pytest, ``TEST_TARGETS``) with ``FAKEQUANT_BACKEND=triton`` on CUDA
   tensors, junit XML.
7. ``bench-fp32``: every QAT op, fwd / fwd+mask / fwd+bwd, 2^20..2^26 elements, providers fakequant-cuda,
   fakequant-triton, reference, ``torch.fake_quantize_*``, ``torch.compile`` of the reference, the copy
   (``bench/run.py --interleaved``): CSV, PNG, and the bandwidth targets.
8. ``resnet50``: ResNet-50 QAT training steps at 224x224, batch 64 (32 if 64 runs out of memory): FP32, QAT with
   BN folding on the CUDA, Triton and reference backends, each also under bf16 autocast.
9. ``bench-lsq-fp32``: the learned-step-size (LSQ) and per-group ops, the same way.
10. ``bench-bf16``: the QAT ops' benchmark again with bf16 tensors.

``<out>/summary.md`` is rewritten after every step, so a run cut off at any point still leaves what it measured,
with the GPU, driver, torch, CUDA and Triton versions. Without a CUDA GPU the command exits at once (status 3)
with a message that says what it needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python tools/gpu_check.py` puts tools/ first; bench.report is in the root
# The pytest targets of the test steps (arguments after `python -m pytest`, relative to the repository root).
# tests/ops holds every op's tests over each (device, backend) pair; FAKEQUANT_TEST_DEVICE keeps the kit's device,
# and the kit's build has CUDA kernels, so the "auto" pairs would repeat the "cuda" ones.
TEST_TARGETS = {
    "tests-cuda": ["tests/ops", "tests/backends/test_cuda.py", "-k", "not cuda-auto"],
    "compile": ["tests/ops/test_torch_compile.py"],
    "tests-triton": ["tests/backends/test_triton.py"],
}
NO_GPU_STATUS = 3
DEFAULT_BUDGET_S = 450
SETUP_DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # setup.py's DEFAULT_CUDA_ARCH_LIST; tests/test_gpu_check.py keeps them equal


@dataclasses.dataclass
class Step:
    """One command of the kit and what became of it."""

    name: str
    purpose: str
    argv: list[str]
    timeout_s: float
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    junit: Path | None = None
    status: str = "not run"
    seconds: float = 0.0
    detail: str = ""
    log: Path | None = None


# ---------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the kit, or None when it can. Imports torch, never fakequant (not built yet)."""
    try:
        import torch
    except ImportError as error:
        return f"torch cannot be imported ({error}); the kit needs a CUDA build of torch with Triton installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build; the kit needs a CUDA build of torch"
    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device "
            "(torch.cuda.is_available() is False: no NVIDIA GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)"
        )
    return None


def no_gpu_message(reason: str) -> str:
    return (
        f"gpu-check needs a CUDA GPU: {reason}.\n"
        "Run `bash run.sh gpu-check` on a machine with an NVIDIA GPU (sm_80 or newer), its driver, a CUDA build of "
        "torch with Triton, nvcc for the build and compute-sanitizer for the memcheck step; it installs nothing. "
        "`python tools/gpu_check.py --rehearse` runs the same steps on the CPU at tiny sizes."
    )


def cuda_home() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parents[1]) if nvcc else None


def arch_list(capability: tuple[int, int]) -> str:
    """setup.py's default architectures, plus this GPU's own when the default does not hold code for it."""
    own = f"{capability[0]}.{capability[1]}"
    listed = [entry.removesuffix("+PTX") for entry in SETUP_DEFAULT_ARCH_LIST.split(";")]
    return SETUP_DEFAULT_ARCH_LIST if own in listed else f"{SETUP_DEFAULT_ARCH_LIST};{own}"


def environment(rehearse: bool) -> dict[str, str]:
    """What the summary's header states: GPU, driver, versions, commit."""
    import torch

    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": str(torch.version.cuda),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if not rehearse:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        info["gpus visible"] = str(torch.cuda.device_count())
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run(
                [smi, "--query-gpu=driver_version,clocks.max.memory", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            info["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 else "nvidia-smi failed"
        home = cuda_home()
        info["nvcc"] = _first_line([os.path.join(home, "bin", "nvcc"), "--version"], last=True) if home else "none"
    try:
        info["git"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip() or "unknown"
    except OSError:
        info["git"] = "unknown"
    return info


def _first_line(argv: list[str], last: bool = False) -> str:
    try:
        lines = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except OSError as error:
        return f"failed: {error}"
    return (lines[-1] if last else lines[0]) if lines else "no output"


def find_compute_sanitizer() -> str | None:
    home = cuda_home()
    candidates = [os.path.join(home, "bin", "compute-sanitizer")] if home else []
    candidates.append(shutil.which("compute-sanitizer") or "")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def plan(out: Path, rehearse: bool) -> list[Step]:
    """The steps in the order they run. ``rehearse``: on the CPU, at tiny sizes, pytest only collecting."""
    py = sys.executable
    device = "cpu" if rehearse else "cuda"
    collect = ["--collect-only", "-q"] if rehearse else ["-q", "-rfE"]
    steps: list[Step] = []
    if not rehearse:
        import torch

        home = cuda_home()
        build_env = {
            "MAX_JOBS": str(os.cpu_count() or 4),
            "TORCH_CUDA_ARCH_LIST": arch_list(torch.cuda.get_device_capability(0)),
        }
        if home:
            build_env["CUDA_HOME"] = home
        steps.append(Step("build", "fakequant._C for this GPU", [py, "setup.py", "build_ext", "--inplace"], 240,
                          build_env))  # fmt: skip
    smoke_backends = (("cuda", "auto"),) if rehearse else (("cuda", "cuda"), ("triton", "triton"))
    for label, backend in smoke_backends:
        steps.append(Step(
            f"smoke-{label}", f"every op once on tiny {device} tensors, {backend} backend, against the reference",
            [py, "tools/kernel_smoke.py", "--device", device, "--backend", backend], 90,
        ))  # fmt: skip
    steps.append(Step(
        "tests-cuda", f"{' '.join(TEST_TARGETS['tests-cuda'])}: every op on each backend against the reference",
        [py, "-m", "pytest", *TEST_TARGETS["tests-cuda"], *collect, f"--junitxml={out / 'junit-cuda.xml'}"], 180,
        env={"FAKEQUANT_TEST_DEVICE": device}, junit=out / "junit-cuda.xml",
    ))  # fmt: skip
    steps.append(Step(
        "compile", "torch.compile(fullgraph=True) of every op, each backend",
        [py, "-m", "pytest", *TEST_TARGETS["compile"], *collect, f"--junitxml={out / 'junit-compile.xml'}"], 150,
        env={"FAKEQUANT_TEST_DEVICE": device}, junit=out / "junit-compile.xml",
    ))  # fmt: skip
    sanitizer = None if rehearse else find_compute_sanitizer()
    memcheck = [sanitizer or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1"]
    steps.append(Step(
        "memcheck", "compute-sanitizer memcheck over every CUDA kernel, tiny sizes",
        [*memcheck, py, "tools/kernel_smoke.py", "--device", "cuda", "--backend", "cuda"], 180,
        env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},  # the sanitizer then sees each tensor's own allocation
    ))  # fmt: skip
    if rehearse:
        steps[-1].status, steps[-1].detail = "not run", "a rehearsal has no GPU"
    elif sanitizer is None:
        steps[-1].status, steps[-1].detail = "not run", "compute-sanitizer not found (CUDA_HOME/bin or PATH)"
    steps.append(Step(
        "tests-triton", f"{' '.join(TEST_TARGETS['tests-triton'])} with FAKEQUANT_BACKEND=triton",
        [py, "-m", "pytest", *TEST_TARGETS["tests-triton"], *collect, f"--junitxml={out / 'junit-triton.xml'}"], 240,
        env={"FAKEQUANT_BACKEND": "triton"}, junit=out / "junit-triton.xml",
    ))  # fmt: skip
    bench = [py, "bench/run.py", "--interleaved", "--device", device, "--out", str(out / "bench")]
    if rehearse:
        bench += ["--sizes", "18", "--rounds", "1", "--providers", "fakequant", "reference", "torch", "copy"]
    else:
        bench += ["--sizes", "20", "22", "24", "26", "--rounds", "10"]
    resnet = [py, "examples/resnet50_qat.py", "--device", device, "--json", str(out / "resnet50.json"),
              "--export-dir", str(out / "resnet50-export"), "--precisions", "fp32", "bf16"]  # fmt: skip
    if rehearse:
        resnet += ["--image-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--skip-reference"]
    else:
        resnet += ["--image-size", "224", "--batch-size", "64", "--steps", "8", "--warmup", "3",
                   "--backends", "cuda", "triton"]  # fmt: skip
    # The op benchmark in two runs, so that a run cut off by its time limit loses only its own ops (bench/run.py
    # writes its results when it finishes): the QAT ops first, the learned-range and per-group ops after ResNet-50.
    core_ops = ["--ops", "per_tensor", "per_channel", "binarize", "bn_fold", "bn_fold_divided"]
    steps.append(Step("bench-fp32", "op benchmark, fp32", [*bench, *core_ops, "--dtype", "float32"], 200))
    steps.append(Step("resnet50", "ResNet-50 QAT training steps, fp32 and bf16 autocast", resnet, 200))
    steps.append(Step("bench-lsq-fp32", "op benchmark of the LSQ and per-group ops, fp32",
                      [*bench, "--ops", "learnable", "per_group", "--dtype", "float32"], 120))  # fmt: skip
    steps.append(Step("bench-bf16", "op benchmark, bf16", [*bench, *core_ops, "--dtype", "bfloat16"], 150))
    return steps


def run_step(step: Step, out: Path, index: int, remaining_s: float) -> None:
    """Runs ``step`` with its output in ``<out>/logs/<index>-<name>.log``; sets status, seconds and detail."""
    if step.status == "not run" and step.detail:
        return  # decided when planned (no sanitizer, a rehearsal)
    timeout = min(step.timeout_s, remaining_s)
    if timeout < 15:
        step.detail = f"not started: {remaining_s:.0f} s of the budget left"
        return
    step.log = out / "logs" / f"{index:02d}-{step.name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _python_path(), **step.env}
    start = time.monotonic()
    with open(step.log, "w") as log:
        log.write("$ " + " ".join(step.argv) + "\n" + "".join(f"  {k}={v}\n" for k, v in step.env.items()) + "\n")
        log.flush()
        try:
            # Its own process group, so that a time-out also ends what the step started (pytest workers,
            # torch.compile's compile workers, the python under compute-sanitizer), which would hold the GPU.
            process = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        except OSError as error:
            step.status = f"FAILED to start ({error})"
        else:
            try:
                returncode = process.wait(timeout=timeout)
                step.status = "passed" if returncode == 0 else f"FAILED (exit {returncode})"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                step.status = f"TIMED OUT ({timeout:.0f} s)"
    step.seconds = time.monotonic() - start
    step.detail = describe(step)


def _python_path() -> str:
    existing = os.environ.get("PYTHONPATH", "")
    return str(ROOT) + (os.pathsep + existing if existing else "")


def describe(step: Step) -> str:
    """One line on what the step found: test counts, mismatches, sanitizer errors."""
    text = step.log.read_text(errors="replace") if step.log and step.log.exists() else ""
    if step.junit is not None:
        counts = junit_counts(step.junit)
        if counts and not counts.startswith("0 passed, 0 failed, 0 errors, 0 skipped"):
            return counts
    if step.name == "resnet50" and "--json" in step.argv:
        path = Path(step.argv[step.argv.index("--json") + 1])
        if path.exists():
            rows = json.loads(path.read_text())["rows"]
            return ", ".join(f"{r['configuration']} {r['x_fp32']:.2f}x" for r in rows if r["quantized"])
    if step.name.startswith("bench"):
        verdicts = [line.rsplit(": ", 1)[-1] for line in text.splitlines() if "of copy BW (target" in line]
        if verdicts:
            counts = {v: verdicts.count(v) for v in ("met", "MISSED", "DEFECT")}
            return "GPU bandwidth targets: " + ", ".join(f"{n} {v}" for v, n in counts.items())
    for line in reversed(text.splitlines()):
        found = line.startswith(("kernel smoke:", "========= ERROR SUMMARY", "wrote ", "exported ", "no tests ran"))
        if found or "Error" in line or " collected in " in line:
            return line.strip()[:300]
    return ""


def junit_counts(path: Path) -> str:
    if not path.exists():
        return ""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped"


def junit_failures(path: Path, limit: int = 40) -> list[str]:
    """``file::test: first line of the message`` of every failed or erroring test case."""
    if not path.exists():
        return []
    failures = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error"):
                message = (child.get("message") or "").strip().splitlines()
                failures.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:200] if message else ''}")
    return failures[:limit]


def skip_reasons(path: Path, limit: int = 10) -> list[str]:
    """The distinct reasons tests were skipped (a GPU run should skip almost nothing)."""
    if not path.exists():
        return []
    reasons: dict[str, int] = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        for child in case:
            if child.tag == "skipped":
                reason = (child.get("message") or "").strip()[:160]
                reasons[reason] = reasons.get(reason, 0) + 1
    return [f"{count} x {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])][:limit]


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def bench_section(out: Path, device: str, dtype: str) -> list[str]:
    """The benchmark rows at the two largest sizes, with the GPU targets, from the newest run of ``dtype``."""
    import re

    from bench import report

    # bench/run.py names a run <date>_<time>[-quick][-<device>][-<dtype>], the float32 and cpu parts left out.
    suffix = ("" if device == "cpu" else f"-{device}") + ("" if dtype == "float32" else f"-{dtype}")
    pattern = re.compile(r"\d{4}-\d\d-\d\d_\d{4}(-quick)?" + re.escape(suffix))
    runs = sorted(p for p in (out / "bench").glob("*.json") if pattern.fullmatch(p.stem))
    rows = []
    for run_path in runs:  # every run of this device and dtype (the kit splits the ops over two runs)
        run_rows, _ = report.load_rows(run_path)
        rows += [{**r, "order": len(rows) + r["order"]} for r in run_rows]
    if not rows:
        return []
    rows = report.sort_rows(report.derive(rows))
    largest = sorted({r["numel"] for r in rows})[-2:]
    picked = [r for r in rows if r["numel"] in largest]
    files = ", ".join(p.with_suffix(".csv").name for p in runs)
    lines = [f"### Op benchmark, {dtype} ({files} and their PNG plots)", "", report.format_markdown(picked), ""]
    targets = report.format_targets(rows)
    if targets:
        lines += ["```", targets, "```", ""]
    return lines


def resnet_section(out: Path) -> list[str]:
    path = out / "resnet50.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    lines = [
        f"### ResNet-50 training step ({data['device_name']}, {data['image_size']}x{data['image_size']}, "
        f"batch {data['batch_size']}, {data['steps']} timed steps after {data['warmup']} warm-up, interleaved)",
        "",
        "| configuration | median step | x FP32 (same precision) | images/s |",
        "|---|---:|---:|---:|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['configuration']} | {row['median_s'] * 1e3:.1f} ms | {row['x_fp32']:.3f}x | "
            f"{row['images_per_s']:.0f} |"
        )
    return lines + [""]


def write_summary(
    out: Path, info: dict[str, str], steps: list[Step], started: float, budget_s: float, device: str
) -> None:
    lines = ["# fakequant GPU check", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [f"- elapsed: {time.monotonic() - started:.0f} s of a {budget_s:.0f} s budget", ""]
    lines += ["| step | what | status | seconds | result | log |", "|---|---|---|---:|---|---|"]
    for step in steps:
        log = step.log.relative_to(out) if step.log else ""
        lines.append(f"| {step.name} | {step.purpose} | {step.status} | {step.seconds:.0f} | {step.detail} | {log} |")
    lines.append("")
    for step in steps:
        if step.junit is not None:
            failures = junit_failures(step.junit)
            if failures:
                lines += [f"### {step.name}: failures", "", *[f"- {f}" for f in failures], ""]
            skips = skip_reasons(step.junit)
            if skips and step.status == "passed":
                lines += [f"### {step.name}: skipped", "", *[f"- {s}" for s in skips], ""]
        elif step.log and step.log.exists() and step.status != "passed":
            tail = step.log.read_text(errors="replace").splitlines()[-25:]
            lines += [f"### {step.name}: last lines of its log", "", "```", *tail, "```", ""]
    for section in (bench_section(out, device, "float32"), resnet_section(out), bench_section(out, device, "bfloat16")):
        lines += section
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "status.json").write_text(
        json.dumps([{k: str(v) for k, v in dataclasses.asdict(s).items()} for s in steps], indent=1)
    )


def retry_smaller_batch(step: Step) -> bool:
    """The ResNet-50 step ran out of GPU memory at batch 64: run it again at 32."""
    text = step.log.read_text(errors="replace") if step.log and step.log.exists() else ""
    if step.name != "resnet50" or step.status == "passed" or "OutOfMemoryError" not in text:
        return False
    index = step.argv.index("--batch-size")
    if step.argv[index + 1] == "32":
        return False
    step.argv[index + 1] = "32"
    step.status, step.purpose = "not run", step.purpose + " (batch 32: 64 ran out of memory)"
    return True


def export(out: Path, destination: Path) -> None:
    """Copies summary.md and status.json to ``destination`` with everything else as one gzipped tar: a machine
    lent for a few minutes hands back a handful of files, not a folder tree."""
    import tarfile

    destination.mkdir(parents=True, exist_ok=True)
    for name in ("summary.md", "status.json"):
        if (out / name).exists():
            shutil.copyfile(out / name, destination / name)
    partial = destination / "gpu-check.tar.gz.partial"
    skipped = {out / "resnet50-export", destination.resolve()}  # the exported weights (100 MB), the archive itself

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        path = out / Path(info.name).relative_to("gpu-check")
        return None if path in skipped else info

    with tarfile.open(partial, "w:gz") as archive:
        archive.add(out, arcname="gpu-check", filter=keep)
    partial.replace(destination / "gpu-check.tar.gz")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT") or "gpu-check"),
        help="output folder (default: $GPU_CHECK_OUT, else gpu-check/)",
    )  # fmt: skip
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--rehearse", action="store_true", help="run every step on the CPU at tiny sizes")
    parser.add_argument("--only", nargs="+", help="run only these steps (by name)")
    parser.add_argument(
        "--export", type=Path,
        help="after every step, also copy summary.md and status.json here with the rest as gpu-check.tar.gz",
    )  # fmt: skip
    args = parser.parse_args(argv)
    reason = None if args.rehearse else no_gpu_reason()
    if reason is not None:
        print(no_gpu_message(reason), file=sys.stderr)
        return NO_GPU_STATUS
    started = time.monotonic()
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    info = environment(args.rehearse)
    info["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    steps = plan(out, args.rehearse)
    device = "cpu" if args.rehearse else "cuda"
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in steps})
        if unknown:
            parser.error(f"--only {' '.join(unknown)}: no such step; steps: {', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in args.only]
    write_summary(out, info, steps, started, args.budget, device)
    for index, step in enumerate(steps, 1):
        print(f"[{time.monotonic() - started:5.0f} s] {step.name}: {step.purpose}", flush=True)
        run_step(step, out, index, args.budget - (time.monotonic() - started))
        if retry_smaller_batch(step):
            run_step(step, out, index, args.budget - (time.monotonic() - started))
        print(f"          {step.status} {step.seconds:.0f} s {step.detail}", flush=True)
        write_summary(out, info, steps, started, args.budget, device)
        if args.export:
            export(out, args.export)
    print(f"summary: {out / 'summary.md'}")
    failed = [s.name for s in steps if s.status not in ("passed", "not run")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
