"""retain_freed_memory: freed CPU memory is reused without page faults (glibc only)."""

from __future__ import annotations

import ctypes
import sys

import pytest

from tests.test_package import run_python

IS_GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# Allocates and fills a 64 MiB tensor round after round (above glibc's largest mmap threshold, so by default
# each one is a fresh mapping) and prints the page faults of the last five rounds. With freed memory retained
# the heap grows for the first rounds (small allocations in between split the freed block) and then settles
# (measured: by round 9 of 50, in three runs).
COUNT_FAULTS = """
import resource, torch, fakequant
if {retain}:
    assert fakequant.retain_freed_memory() is True
def round_():
    torch.empty(2**24).fill_(1.0)
for _ in range(30):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not IS_GLIBC, reason="mallopt settings exist only in glibc")
@pytest.mark.parametrize("retain", [False, True])
def test_retain_freed_memory_stops_page_faults(retain):
    result = run_python(COUNT_FAULTS.format(retain=retain))
    assert result.returncode == 0, result.stderr
    faults = int(result.stdout.split()[-1])
    pages = 5 * 2**26 // 4096  # five rounds of 64 MiB
    if retain:
        assert faults < pages // 100, faults
    else:  # the premise: with glibc's defaults every round faults its pages in again
        assert faults > pages // 2, faults


@pytest.mark.skipif(IS_GLIBC, reason="checks the non-glibc fallback")
def test_retain_freed_memory_is_a_no_op_without_glibc():
    result = run_python("import fakequant; print(fakequant.retain_freed_memory())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
