"""Runs the op benchmarks and prints one table; writes a CSV and a PNG plot with machine metadata.

Usage::

    python bench/run.py                 # full: sizes 2^16..2^24 and ResNet-50 shapes (tens of minutes on 2 cores)
    python bench/run.py --quick         # 2^18, 2^22 and two ResNet-50 shapes (a few minutes on 2 cores)
    python bench/run.py --ops per_channel binarize --providers fakequant reference copy
    python bench/run.py --quick --interleaved   # providers timed round-robin (steadier ratios on a busy machine)
    python bench/run.py --from-json bench/results/<stamp>.json --stat min   # redraw from a past run

Each ``bench/bench_*.py`` file runs under pytest-benchmark (``--benchmark-json``); the rows come from the
``extra_info`` that ``bench/common.py`` records (provider, op, mode, size, numel, bytes), and ``bench/report.py``
turns them into the table, the targets, the CSV and the plot. Columns:

``time``        median time of one call (forward, or forward+backward); ``--stat min`` uses the fastest
                round instead, the better estimate of the uncontended cost on a shared machine.
``GB/s``        bytes the op must move (``bench/common.py``: 8 B/element forward, 9 with the mask, 18
                forward+backward for fp32) divided by the time.
``copy BW``     that bandwidth as a fraction of ``torch.add(x, 0, out=y)``'s (8 B/element) measured in the
                same run at the same size: 1.0 means the op streams memory as fast as a copy.
``x copy``      the time over the copy's time (the targets: <= 1.1 forward, <= 1.25 with the mask,
                <= 3 forward+backward).
``vs ref``      the reference composition's time over this provider's (higher is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/run.py` puts bench/ first; the package lives in the root

from bench import report  # noqa: E402


def op_key(path: Path) -> str:
    """``bench_fake_quant_per_channel.py`` -> ``per_channel``; ``bench_bn_fold.py`` -> ``bn_fold``."""
    return path.stem.removeprefix("bench_").removeprefix("fake_quant_")


def bench_files() -> dict[str, Path]:
    """The op benchmarks: ``bench_*.py`` files built on ``bench/common.py`` (``common.make_test``). Other bench
    files (whole training steps, e.g. ``bench_qat_step.py``) keep their own reports; run them with pytest."""
    return {op_key(p): p for p in sorted(BENCH_DIR.glob("bench_*.py")) if "common.make_test(" in p.read_text()}


def other_bench_files() -> list[Path]:
    return [p for p in sorted(BENCH_DIR.glob("bench_*.py")) if "common.make_test(" not in p.read_text()]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


class _Progress:
    """A pytest plugin that draws one tqdm bar over every benchmark and counts failures."""

    def __init__(self) -> None:
        self.bar = None
        self.failed: list[str] = []

    def pytest_collection_finish(self, session) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=len(session.items), desc="benchmarks", unit="bench", file=sys.__stderr__)

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self.failed.append(report.nodeid)
        done = report.when == "call" or (report.when == "setup" and not report.passed)
        if done and self.bar is not None:
            self.bar.set_postfix_str(report.nodeid.split("[")[-1].rstrip("]")[:40], refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_benchmarks(files: list[Path], json_path: Path, log_path: Path, args) -> list[str]:
    """Runs pytest-benchmark in this process (output to ``log_path``); returns the failed test ids."""
    import pytest

    if args.quick:
        # Short rounds: the quick run trades precision for finishing in a few minutes.
        timing = ["--benchmark-max-time=0.25", "--benchmark-min-rounds=3"]
    else:
        timing = ["--benchmark-max-time=1.0", "--benchmark-min-rounds=5"]
    pytest_args = [
        *map(str, files),
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "--benchmark-quiet",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(ROOT),
        *timing,
    ]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    progress = _Progress()
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        code = pytest.main(pytest_args, plugins=[progress])
    progress.close()
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        raise SystemExit(f"no benchmark matched (--ops {args.ops or 'all'}, -k {args.keyword!r}); see {log_path}")
    if code not in (0, 1):  # 1: some benchmarks failed, the rest still count
        raise SystemExit(f"pytest exited with code {code}; see {log_path}")
    return progress.failed


def keyword_filter(expression: str | None):
    """pytest's ``-k`` for the interleaved run: ``expression``'s words match case-insensitive substrings of a
    benchmark's full name (``file::name``), combined with ``and``/``or``/``not`` (pytest's own parser)."""
    if not expression:
        return None
    from _pytest.mark import expression as pytest_expression

    # pytest < 8.4 raises its own ParseError for a malformed expression, later versions SyntaxError
    malformed = getattr(pytest_expression, "ParseError", SyntaxError)
    try:
        compiled = pytest_expression.Expression.compile(expression)
    except malformed as error:
        raise SystemExit(
            f"-k {expression!r}: {error}; allowed: a pytest -k expression, e.g. '2_22 and not compile'"
        ) from None
    return lambda name: compiled.evaluate(lambda word, **_: word.lower() in name.lower())


def run_interleaved(files: list[Path], json_path: Path, args) -> list[str]:
    """Times every provider and mode of each case round-robin (``common.interleaved``); writes the rows as a
    pytest-benchmark-shaped JSON. Returns the cases that failed."""
    import importlib
    import traceback

    from tqdm import tqdm

    from bench import common

    rounds = args.rounds or (10 if args.quick else 30)
    specs = [(importlib.import_module(f"bench.{p.stem}").SPEC, p.name) for p in files]
    matches = keyword_filter(args.keyword)
    benchmarks, failed = [], []
    with tqdm(total=sum(len(s.cases) for s, _ in specs), desc="cases", unit="case", file=sys.__stderr__) as bar:
        for spec, file_name in specs:
            keep = None if matches is None else (lambda name, prefix=file_name + "::": matches(prefix + name))
            for case in spec.cases:
                bar.set_postfix_str(f"{spec.op} {case.label}", refresh=False)
                try:
                    benchmarks += common.interleaved(spec, case, rounds, keep, failed)
                except Exception:  # noqa: BLE001  (report the case and keep measuring the others)
                    failed.append(f"{spec.op} {case.label}: {traceback.format_exc(limit=1).strip()}")
                bar.update(1)
    json_path.write_text(json.dumps({"benchmarks": benchmarks}, indent=1))
    return failed


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_metadata(args, started: dt.datetime) -> dict:
    import torch

    import fakequant
    from bench import common

    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": common.THREADS,
        "device": str(common.DEVICE),
        "dtype": str(common.DTYPE).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fakequant": fakequant.__version__,
        "fakequant_backends": ",".join(f"{k}={v}" for k, v in common.FAKEQUANT_BACKENDS.items()) or "none",
        "extension_loaded": fakequant.extension_loaded(),
        "nni": common.NNI,
        "torchao": common.TORCHAO,
        "git": git_commit(),
        "mode": "quick" if args.quick else "full",
        "freed_memory_retained": common.FREED_MEMORY_RETAINED,
    }
    if common.DEVICE.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(common.DEVICE)
        meta["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        meta["load_avg_start"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return meta


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    files = bench_files()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few sizes and short rounds (a few minutes on 2 cores)")
    parser.add_argument("--ops", nargs="+", choices=sorted(files), help="ops to run (default: every bench file)")
    parser.add_argument("--providers", nargs="+", help="keep only these providers (copy and reference are needed "
                        "for the ratios), e.g. fakequant reference copy")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="device of the tensors (default cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
        help="dtype of the tensor being quantized (default float32)",
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", metavar="LOG2",
        help="flat sizes as powers of two, replacing the default sweep and the ResNet-50 shapes (e.g. 20 22 24 26)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression (ids look like 2_22-fakequant-fwd)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="directory for CSV, PNG, JSON, log")
    parser.add_argument("--from-json", type=Path, help="skip running: rebuild table, CSV and plot from this JSON")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="instead of pytest-benchmark, time every provider and mode of a case round-robin, so that load "
        "from other processes hits all of them alike (for shared machines)",
    )
    parser.add_argument("--rounds", type=int, help="rounds of --interleaved (default 10 quick, 30 full)")
    parser.add_argument(
        "--default-malloc", action="store_true",
        help="keep glibc's malloc defaults (by default fakequant.retain_freed_memory() is called, so that no "
        "provider is timed page-faulting its output in)",
    )
    parser.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="time statistic behind every column (default median; min estimates the uncontended cost when "
        "other processes share the cores)",
    )
    return parser.parse_args(argv), files


def main(argv=None) -> int:
    args, files = parse_args(argv)
    # Read by bench/common.py at import, so set before pytest imports the bench files.
    os.environ["FAKEQUANT_BENCH_QUICK"] = "1" if args.quick else "0"
    os.environ["FAKEQUANT_BENCH_DEVICE"] = args.device
    os.environ["FAKEQUANT_BENCH_DTYPE"] = args.dtype
    if args.sizes:
        os.environ["FAKEQUANT_BENCH_SIZES"] = ",".join(map(str, args.sizes))
    os.environ["FAKEQUANT_BENCH_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.providers:
        os.environ["FAKEQUANT_BENCH_PROVIDERS"] = ",".join(args.providers)
    os.environ["FAKEQUANT_BENCH_DEFAULT_MALLOC"] = "1" if args.default_malloc else "0"

    started = dt.datetime.now(dt.timezone.utc)
    args.out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    if args.from_json:
        json_path = args.from_json
        meta, stem = report.saved_run(json_path)
    else:
        suffix = ("-quick" if args.quick else "") + ("" if args.device == "cpu" else f"-{args.device.split(':')[0]}")
        suffix += "" if args.dtype == "float32" else f"-{args.dtype}"
        stem = args.out / (started.strftime("%Y-%m-%d_%H%M") + suffix)
        json_path = stem.with_suffix(".json")
        meta = machine_metadata(args, started)
        chosen = [files[op] for op in (args.ops or files)]
        print(f"running {', '.join(p.name for p in chosen)} ({meta['mode']}); pytest output: {stem}.log", flush=True)
        others = other_bench_files()
        if others:
            print(f"not run (not on bench/common.py; run them with pytest): {', '.join(p.name for p in others)}")
        if args.interleaved:
            meta["timing"] = f"interleaved, {args.rounds or (10 if args.quick else 30)} rounds"
            failed = run_interleaved(chosen, json_path, args)
        else:
            meta["timing"] = "pytest-benchmark"
            failed = run_benchmarks(chosen, json_path, stem.with_suffix(".log"), args)
        if hasattr(os, "getloadavg"):
            meta["load_avg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        meta["wall_time_s"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
        stem.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2))

    rows, skipped = report.load_rows(json_path)
    if not rows:
        raise SystemExit(
            f"no benchmark ran (--ops {args.ops or 'all'}, -k {args.keyword!r}, --providers {args.providers or 'all'});"
            " benchmark names look like bench_binarize.py::binarize[2_22-fakequant-fwd]"
        )
    report.report(rows, meta, stem, args.stat, args.markdown)
    if skipped:
        print(f"ignored {len(skipped)} benchmarks without bench/common.py's extra_info: {', '.join(skipped[:5])} ...")
    if failed:
        print(f"{len(failed)} benchmarks FAILED (see {stem}.log): {', '.join(failed[:5])}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
