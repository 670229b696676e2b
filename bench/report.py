"""The op benchmarks' report: the table, the targets, a CSV and a PNG plot from a run's pytest-benchmark JSON.

``bench/run.py`` runs the benchmarks and calls :func:`report` on what they wrote; ``--from-json`` calls it on a
past run (:func:`saved_run`). The rows are the ``extra_info`` that ``bench/common.py`` records, one per
benchmark, with the timing statistics beside them (:func:`load_rows`).

Example (a past run redrawn, what ``python bench/run.py --from-json <run>.json --stat min`` does)::

    from bench import report

    meta, stem = report.saved_run(json_path)        # json_path: bench/results/<stamp>.json
    rows, skipped = report.load_rows(json_path)
    report.report(rows, meta, stem, stat="min")     # prints the table; writes <stamp>-min.csv and .png
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from bench.providers import MODE_ORDER, rank

# The targets at 2^22 fp32 on 2 threads: the fused op's time over the copy's time.
TARGETS_X_COPY = {"fwd": 1.1, "fwd+mask": 1.25, "fwd+bwd": 3.0}
TARGET_SIZE = "2^22"

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
            rank(r["mode"], MODE_ORDER),
            size_first[(r["op"], r["size"])],
            rank(r["provider"]),
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


# Printed under the targets of a pytest-benchmark run: that mode times the copy from cache, so every fused op would
# "miss" against it (docs/benchmarks.md, "Numbers once quoted in bench comments").
PYTEST_BENCHMARK_TARGETS_CAVEAT = (
    "  (pytest-benchmark repeats each case on the same buffers, so a case whose buffers fit in the CPU's last-level\n"
    "  cache runs from it (at 2^22 the copy's two 16 MB buffers, on a 32 MB L3) while one that touches more memory\n"
    "  (a mask, a backward) does not. The targets are read from --interleaved runs, whose providers evict each\n"
    "  other's data.)"
)


# On a GPU: every op at >= 90% of the copy's bandwidth (bytes the op must move over its time, against
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
    """The targets (2^22 fp32): each fused provider's time over the copy's, met or missed.

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
    providers = sorted({r["provider"] for r in rows if r["provider"] != "copy"}, key=rank)
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


def saved_run(json_path: Path) -> tuple[dict, Path]:
    """The metadata (``<run>.meta.json``, empty if missing) and the path stem of a past run's JSON."""
    meta_path = json_path.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return meta, json_path.with_suffix("")


def report(rows: list[dict], meta: dict, stem: Path, stat: str = "median", markdown: bool = False) -> Path:
    """Prints the run's metadata, table and targets (and the markdown table); writes its CSV and PNG plot.

    Args:
        rows: :func:`load_rows` of the run's JSON (at least one).
        meta: the run's metadata; gets ``statistic``.
        stem: the run's path without suffix (``bench/results/<date>_<time>[-quick]``).
        stat: ``median`` or ``min``, the time behind every column; ``min`` writes ``<stem>-min.csv`` and ``.png``.
        markdown: also print the table as markdown.

    Returns the path of the CSV and PNG without their suffix.
    """
    rows = sort_rows(derive(rows, stat))
    meta["statistic"] = stat
    print()
    for key, value in meta.items():
        print(f"{key}: {value}")
    print()
    print(format_table(rows))
    targets = format_targets(rows, meta.get("timing", ""))
    if targets:
        print()
        print(targets)
    if markdown:
        print()
        print(format_markdown(rows))
    out = stem if stat == "median" else stem.with_name(f"{stem.name}-{stat}")
    write_csv(rows, meta, out.with_suffix(".csv"))
    if rows:
        plot(rows, meta, out.with_suffix(".png"))
    print(f"\nwrote {out}.csv, {out}.png, {stem}.json")
    return out
