"""Runs the op benchmarks and prints one table; writes a CSV and a PNG plot with machine metadata.

Usage::

    python bench/run.py                 # full: sizes 2^16..2^24 and ResNet-50 shapes (tens of minutes on 2 cores)
    python bench/run.py --quick         # 2^18, 2^22 and two ResNet-50 shapes (a few minutes on 2 cores)
    python bench/run.py --ops per_channel binarize --providers fakequant reference copy
    python bench/run.py --quick --interleaved   # providers timed round-robin (steadier ratios on a busy machine)
    python bench/run.py --from-json bench/results/<stamp>.json --stat min   # redraw from a past run

Each ``bench/bench_*.py`` file runs under pytest-benchmark (``--benchmark-json``); the rows come from the
``extra_info`` that ``bench/common.py`` records (provider, op, mode, size, numel, bytes). Columns:

``time``        median time of one call (forward, or forward+backward); ``--stat min`` uses the fastest
                round instead, the better estimate of the uncontended cost on a shared machine.
``GB/s``        bytes the op must move (``bench/common.py``: 8 B/element forward, 9 with the mask, 18
                forward+backward for fp32) divided by the time.
``copy BW``     that bandwidth as a fraction of ``torch.add(x, 0, out=y)``'s (8 B/element) measured in the
                same run at the same size: 1.0 means the op streams memory as fast as a copy.
``x copy``      the time over the copy's time (the issue's targets: <= 1.1 forward, <= 1.25 with the mask,
                <= 3 forward+backward).
``vs ref``      the reference composition's time over this provider's (higher is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/run.py` puts bench/ first; the package lives in the root

MODE_ORDER = ("copy", "fwd", "fwd+mask", "fwd+bwd")
PROVIDER_ORDER = ("copy", "fakequant", "reference", "torch", "compile", "nni")
# The targets at 2^22 fp32 on 2 threads: the fused op's time over the copy's time.
TARGETS_X_COPY = {"fwd": 1.1, "fwd+mask": 1.25, "fwd+bwd": 3.0}
TARGET_SIZE = "2^22"


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
# Rows, table, CSV, plot
# ---------------------------------------------------------------------------------------------

REQUIRED = ("op", "provider", "mode", "size", "numel", "bytes")


def load_rows(json_path: Path) -> tuple[list[dict], list[str]]:
    """Rows from a pytest-benchmark JSON, plus the names of benchmarks lacking the common extra_info."""
    data = json.loads(json_path.read_text())
    rows, skipped = [], []
    for order, bench in enumerate(data["benchmarks"]):
        info = bench.get("extra_info", {})
        if not all(k in info for k in REQUIRED):
            skipped.append(bench["name"])
            continue
        stats = bench["stats"]
        rows.append(
            {
                **info,
                "order": order,
                "median_s": stats["median"],
                "min_s": stats["min"],
                "iqr_s": stats["iqr"],
                "rounds": stats["rounds"],
            }
        )
    return rows, skipped


def derive(rows: list[dict], stat: str = "median") -> list[dict]:
    """Adds GB/s, the copy-bandwidth fraction, the time over the copy's, and the speedup over reference,
    all from the ``stat`` time (``median`` or ``min``) of every benchmark."""
    for r in rows:
        r["time_s"] = r[f"{stat}_s"]
    copy = {(r["op"], r["size"]): r for r in rows if r["provider"] == "copy"}
    ref = {(r["op"], r["mode"], r["size"]): r for r in rows if r["provider"] == "reference"}
    for r in rows:
        r["gbps"] = r["bytes"] / r["time_s"] / 1e9
        c = copy.get((r["op"], r["size"]))
        if c is not None:
            copy_gbps = c["bytes"] / c["time_s"] / 1e9
            r["copy_bw_fraction"] = r["gbps"] / copy_gbps
            r["x_copy"] = r["time_s"] / c["time_s"]
        base = ref.get((r["op"], r["mode"], r["size"]))
        if base is not None:
            r["speedup_vs_reference"] = base["time_s"] / r["time_s"]
    return rows


def _rank(order: tuple[str, ...], value: str) -> int:
    key = value.split("-")[0] if value not in order else value
    return order.index(key) if key in order else len(order)


def sort_rows(rows: list[dict]) -> list[dict]:
    op_first = {}
    size_first = {}
    for r in rows:
        op_first.setdefault(r["op"], r["order"])
        size_first.setdefault((r["op"], r["size"]), r["order"])
    return sorted(
        rows,
        key=lambda r: (
            op_first[r["op"]],
            _rank(MODE_ORDER, r["mode"]),
            size_first[(r["op"], r["size"])],
            _rank(PROVIDER_ORDER, r["provider"]),
            r["provider"],
        ),
    )


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _num(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


TABLE_COLUMNS = ("op", "mode", "size", "provider", "time", "GB/s", "copy BW", "x copy", "vs ref")


def _row_cells(r: dict) -> tuple[str, ...]:
    """One result row as the text of TABLE_COLUMNS, for the plain and the markdown table alike."""
    speedup = _num(r.get("speedup_vs_reference"), ".2f")
    return (
        r["op"],
        r["mode"],
        r["size"],
        r["provider"],
        _time(r["time_s"]),
        _num(r["gbps"], ".2f"),
        _num(r.get("copy_bw_fraction"), ".2f"),
        _num(r.get("x_copy"), ".2f"),
        speedup if speedup == "-" else speedup + "x",
    )


def format_table(rows: list[dict]) -> str:
    lines = []
    previous_group = None
    for r in rows:
        group = (r["op"], r["mode"])
        if previous_group is not None and group != previous_group:
            lines.append(None)
        previous_group = group
        lines.append(_row_cells(r))
    widths = [max(len(TABLE_COLUMNS[i]), *(len(line[i]) for line in lines if line)) for i in range(len(TABLE_COLUMNS))]
    right = {4, 5, 6, 7, 8}

    def fmt(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [fmt(TABLE_COLUMNS), fmt(["-" * w for w in widths])]
    out += ["" if line is None else fmt(line) for line in lines]
    return "\n".join(out)


def format_markdown(rows: list[dict]) -> str:
    """The same table as GitHub markdown (for docs/benchmarks.md)."""
    out = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * 4 + "---:|" * 5]
    for r in rows:
        out.append("| " + " | ".join(_row_cells(r)) + " |")
    return "\n".join(out)


# Printed under the targets of a pytest-benchmark run. Measured 2026-12-01 04:36 on the 2-core AMD EPYC VM (32 MB
# L3): that mode's copy at 2^22 took 165-370 us (90-200 GB/s, from cache) while the interleaved runs of the same
# hour timed it at 818-858 us, and every fused op "missed" against it.
PYTEST_BENCHMARK_TARGETS_CAVEAT = (
    "  (pytest-benchmark repeats each case on the same buffers, so a case whose buffers fit in the CPU's last-level\n"
    "  cache runs from it (at 2^22 the copy's two 16 MB buffers, on a 32 MB L3) while one that touches more memory\n"
    "  (a mask, a backward) does not. The targets are read from --interleaved runs, whose providers evict each\n"
    "  other's data.)"
)


# On a GPU (issue 14): every op at >= 90% of the copy's bandwidth (bytes the op must move over its time, against
# the copy's) at 2^24 elements and more; under 85% is a defect to fix or explain.
GPU_TARGET_MIN_LOG2 = 24
GPU_TARGET_COPY_BW = 0.90
GPU_DEFECT_COPY_BW = 0.85


def format_gpu_targets(rows: list[dict]) -> str:
    """The GPU targets: each fused provider's fraction of the copy's bandwidth at 2^24+ elements."""
    lines = []
    for r in rows:
        if not r["provider"].startswith("fakequant") or "copy_bw_fraction" not in r or r.get("kind") != "flat":
            continue
        if r["numel"] < (1 << GPU_TARGET_MIN_LOG2):
            continue
        fraction = r["copy_bw_fraction"]
        verdict = "met" if fraction >= GPU_TARGET_COPY_BW else "MISSED" if fraction >= GPU_DEFECT_COPY_BW else "DEFECT"
        lines.append(
            f"  {r['op']:<16} {r['mode']:<9} {r['size']:<5} {r['provider']:<17} {fraction:5.2f} of copy BW "
            f"(target >= {GPU_TARGET_COPY_BW}, defect < {GPU_DEFECT_COPY_BW}): {verdict}"
        )
    if not lines:
        return ""
    heading = f"GPU targets at 2^{GPU_TARGET_MIN_LOG2}+ elements (bandwidth over the copy's, same run):"
    return heading + "\n" + "\n".join(lines)


def format_targets(rows: list[dict], timing: str = "") -> str:
    """The issue's targets (2^22 fp32): each fused provider's time over the copy's, met or missed.

    ``timing`` is the run's ``meta["timing"]``; a pytest-benchmark run gets :data:`PYTEST_BENCHMARK_TARGETS_CAVEAT`.
    CUDA rows are judged by :func:`format_gpu_targets` instead.
    """
    if any(r.get("device", "cpu").startswith("cuda") for r in rows):
        return format_gpu_targets(rows)
    lines = []
    for r in rows:
        if r["size"] != TARGET_SIZE or not r["provider"].startswith("fakequant") or "x_copy" not in r:
            continue
        limit = TARGETS_X_COPY.get(r["mode"])
        if limit is None:
            continue
        verdict = "met" if r["x_copy"] <= limit else "MISSED"
        lines.append(
            f"  {r['op']:<12} {r['mode']:<9} {r['provider']:<12} {r['x_copy']:5.2f}x copy "
            f"(target <= {limit}x): {verdict}"
        )
    if not lines:
        return ""
    if timing == "pytest-benchmark":
        lines.append(PYTEST_BENCHMARK_TARGETS_CAVEAT)
    return f"Targets at {TARGET_SIZE} fp32 (time over the copy's, same run):\n" + "\n".join(lines)


CSV_FIELDS = (
    "op", "mode", "size", "shape", "kind", "numel", "provider", "median_ms", "min_ms", "iqr_ms", "rounds",
    "bytes", "gbps", "copy_bw_fraction", "x_copy", "speedup_vs_reference", "dtype", "device", "threads",
)  # fmt: skip


def write_csv(rows: list[dict], meta: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        for key, value in meta.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            out = dict(r)
            for src, dst in (("median_s", "median_ms"), ("min_s", "min_ms"), ("iqr_s", "iqr_ms")):
                out[dst] = f"{r[src] * 1e3:.6g}"
            for key in ("gbps", "copy_bw_fraction", "x_copy", "speedup_vs_reference"):
                if key in r:
                    out[key] = f"{r[key]:.4g}"
            writer.writerow(out)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """GB/s against size, one line per provider over the 2^k sweep (ResNet-50 shapes as points); a panel
    per op and mode, with the copy's bandwidth as a dashed black line in every panel of its op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    modes = [m for m in MODE_ORDER if m != "copy" and any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(
        len(ops), len(modes), figsize=(5.2 * len(modes), 3.6 * len(ops)), squeeze=False, sharex=True
    )
    providers = sorted({r["provider"] for r in rows if r["provider"] != "copy"}, key=lambda p: _rank(PROVIDER_ORDER, p))
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    for i, op in enumerate(ops):
        copy_rows = [r for r in rows if r["op"] == op and r["provider"] == "copy"]
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for provider in ["copy", *providers]:
                wanted = "copy" if provider == "copy" else mode
                series = [r for r in (copy_rows if provider == "copy" else rows) if r["op"] == op]
                series = [r for r in series if r["provider"] == provider and r["mode"] == wanted]
                if not series:
                    continue
                style = {"color": "black", "linestyle": "--"} if provider == "copy" else {"color": colors[provider]}
                flat = sorted((r for r in series if r.get("kind", "flat") == "flat"), key=lambda r: r["numel"])
                if flat:
                    ax.plot([r["numel"] for r in flat], [r["gbps"] for r in flat], marker="o", label=provider, **style)
                real = [r for r in series if r.get("kind", "flat") != "flat"]
                if real:
                    ax.scatter(
                        [r["numel"] for r in real],
                        [r["gbps"] for r in real],
                        marker="^",
                        color=style["color"],
                        label=None if flat else provider,
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")  # providers differ by up to 100x
            ax.set_title(f"{op} {mode}", fontsize=10)
            ax.grid(True, alpha=0.3)
            if j == 0:
                ax.set_ylabel("GB/s (bytes the op must move)")
            if i == len(ops) - 1:
                ax.set_xlabel("elements (o: 2^k sweep, ^: ResNet-50 shapes)")
            ax.legend(fontsize=7)
    fig.suptitle(
        f"fakequant benchmarks, {meta.get('date')}: {meta.get('cpu')}, {meta.get('threads')} threads, "
        f"torch {meta.get('torch')}, {meta.get('device')}, {meta.get('mode')} run",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
        meta_path = json_path.with_suffix(".meta.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        stem = json_path.with_suffix("")
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

    rows, skipped = load_rows(json_path)
    if not rows:
        raise SystemExit(
            f"no benchmark ran (--ops {args.ops or 'all'}, -k {args.keyword!r}, --providers {args.providers or 'all'});"
            " benchmark names look like bench_binarize.py::binarize[2_22-fakequant-fwd]"
        )
    rows = sort_rows(derive(rows, args.stat))
    meta["statistic"] = args.stat
    print()
    for key, value in meta.items():
        print(f"{key}: {value}")
    print()
    print(format_table(rows))
    targets = format_targets(rows, meta.get("timing", ""))
    if targets:
        print()
        print(targets)
    if args.markdown:
        print()
        print(format_markdown(rows))
    out = stem if args.stat == "median" else stem.with_name(f"{stem.name}-{args.stat}")
    write_csv(rows, meta, out.with_suffix(".csv"))
    if rows:
        plot(rows, meta, out.with_suffix(".png"))
    print(f"\nwrote {out}.csv, {out}.png, {stem}.json")
    if skipped:
        print(f"ignored {len(skipped)} benchmarks without bench/common.py's extra_info: {', '.join(skipped[:5])} ...")
    if failed:
        print(f"{len(failed)} benchmarks FAILED (see {stem}.log): {', '.join(failed[:5])}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
