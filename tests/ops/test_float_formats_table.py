"""The element format table is written twice, in fakequant/formats.py (the reference and Triton) and in
csrc/float_formats.h (the C++ and CUDA kernels): the two must agree, and each format's constants must follow
from its bits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fakequant.formats import ELEMENT_FORMATS

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "float_formats.h"
ROW = re.compile(r'\{"(\w+)",\s*(\d+),\s*\{(\d+),\s*(\d+),\s*([0-9.]+)f,\s*(-?\d+),\s*(-?\d+)\}\}')


def test_the_cpp_table_matches_formats_py():
    rows = {m[0]: (int(m[1]), int(m[2]), int(m[3]), float(m[4]), int(m[5]), int(m[6]))
            for m in ROW.findall(HEADER.read_text())}  # fmt: skip
    want = {f.name: (f.code, f.ebits, f.mbits, f.max, f.emax, f.emin) for f in ELEMENT_FORMATS.values()}
    assert rows == want


@pytest.mark.parametrize("name", [n for n, f in ELEMENT_FORMATS.items() if not f.is_int])
def test_float_format_constants_follow_from_the_bits(name):
    """max = (2 - 2^(1 - mbits)) * 2^emax (E4M3fn: one mantissa code less, its top code being NaN), emax the
    largest exponent, emin = 1 - bias; FP8 ones equal torch.finfo's."""
    f = ELEMENT_FORMATS[name]
    bias = (1 << (f.ebits - 1)) - 1
    assert f.emin == 1 - bias
    top_exponent = (1 << f.ebits) - 1 - bias - (1 if name == "e5m2" else 0)  # e5m2 keeps its top exponent for inf/NaN
    assert f.emax == top_exponent
    mantissa = 2 - 2.0 ** (1 - f.mbits) if name == "e4m3" else 2 - 2.0 ** -f.mbits
    assert f.max == mantissa * 2.0**f.emax
    torch_dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}.get(name)
    if torch_dtype is not None:
        info = torch.finfo(torch_dtype)
        assert (info.max, info.tiny) == (f.max, 2.0**f.emin)


def test_mx_int8_is_two_s_complement_with_six_fraction_bits():
    f = ELEMENT_FORMATS["int8"]
    assert f.is_int and (f.mbits, f.emax, f.emin, f.max) == (6, 0, 0, 127 / 64)
