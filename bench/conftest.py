"""Benchmark settings shared by bench/: 2 threads, bench_*.py files collected as test modules, and a
closing table of medians, GB/s and time relative to a plain copy measured in the same run."""

from __future__ import annotations

import os

import pytest
import torch

# The targets are stated for 2 threads: the development machine's core count, and a fixed number keeps runs
# comparable when the benchmarks run elsewhere. FAKEQUANT_BENCH_THREADS overrides it (with 1 thread,
# --benchmark-timer=time.thread_time measures CPU time, which a busy machine disturbs less than wall time).
THREADS = int(os.environ.get("FAKEQUANT_BENCH_THREADS", "2"))

_medians: dict[tuple[str, str], tuple[float, float]] = {}


def pytest_configure(config):
    torch.set_num_threads(THREADS)


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def record():
    """record(benchmark, group, provider, bytes_moved) after a benchmark: GB/s into extra_info and the table."""

    def _record(benchmark, group: str, provider: str, bytes_moved: int) -> None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["bytes_moved"] = bytes_moved
        benchmark.extra_info["GB/s"] = round(bytes_moved / median / 1e9, 2)
        benchmark.extra_info["threads"] = torch.get_num_threads()
        _medians[(group, provider)] = (median, bytes_moved)

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _medians:
        return
    terminalreporter.section(f"medians ({THREADS} threads; time relative to the copy in the same run)")
    copy = _medians.get(("forward", "copy"))
    for (group, provider), (median, bytes_moved) in _medians.items():
        ratio = f"{median / copy[0]:6.2f}x copy" if copy else ""
        terminalreporter.write_line(
            f"{group:18s} {provider:28s} {median * 1e3:9.3f} ms {bytes_moved / median / 1e9:7.2f} GB/s  {ratio}"
        )
