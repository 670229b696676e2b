"""The low-precision element formats of the float ops: FP8 (E4M3, E5M2), FP6 (E3M2, E2M3), FP4 (E2M1), INT8.

Every backend reads its constants from this table (the C++/CUDA kernels from ``csrc/float_formats.h``, which
``tests/ops/test_float_formats_table.py`` checks against it). What the ops compute with them:
docs/numerics.md, "Float formats".
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ELEMENT_FORMATS", "ElementFormat", "FP8_FORMATS", "MX_ELEMENTS", "MX_SCALE_MODES", "element_format"]


@dataclass(frozen=True)
class ElementFormat:
    """One element format: sign, ``ebits`` exponent bits, ``mbits`` mantissa bits (an integer format: ``ebits=0``).

    ``max``: the largest finite magnitude; ``emax``: the exponent of the largest power of two it holds (the MX
    shared scale is ``2^(floor(log2(amax)) - emax)``); ``emin``: the exponent of its smallest normal value, below
    which values are subnormal (spaced ``2^(emin - mbits)``).
    """

    name: str
    code: int  # the integer the ops' kernels take
    ebits: int
    mbits: int
    max: float
    emax: int
    emin: int

    @property
    def is_int(self) -> bool:
        return self.ebits == 0


# E4M3 is the "fn" variant (no inf, one NaN: max 448 = 1.75 * 2^8); the others follow IEEE-like encodings
# without inf/NaN (FP6/FP4, OCP MX spec 5.3); MX INT8 is two's complement with an implicit scale of 2^-6,
# saturating symmetrically to +-127/64 as the OCP reference implementation (microxcaling) does.
ELEMENT_FORMATS: dict[str, ElementFormat] = {
    f.name: f
    for f in (
        ElementFormat("e4m3", 0, 4, 3, 448.0, 8, -6),
        ElementFormat("e5m2", 1, 5, 2, 57344.0, 15, -14),
        ElementFormat("e3m2", 2, 3, 2, 28.0, 4, -2),
        ElementFormat("e2m3", 3, 2, 3, 7.5, 2, 0),
        ElementFormat("e2m1", 4, 2, 1, 6.0, 2, 0),
        ElementFormat("int8", 5, 0, 6, 127.0 / 64.0, 0, 0),
    )
}
FP8_FORMATS = ("e4m3", "e5m2")
MX_ELEMENTS = tuple(ELEMENT_FORMATS)
# "floor": the OCP MX spec's 2^(floor(log2(amax)) - emax); "rceil": 2^ceil(log2(amax / max)), what NVIDIA's MXFP8
# kernels (cvt.rp.satfinite.ue8m0) compute and torchao calls RCEIL.
MX_SCALE_MODES = ("floor", "rceil")


def element_format(name: str, allowed: tuple[str, ...] = MX_ELEMENTS, what: str = "fmt") -> ElementFormat:
    """The format named ``name``, or a ``ValueError`` naming what is allowed."""
    if name not in allowed:
        raise ValueError(f"fakequant: {what} {name!r} is not a supported format; allowed: {', '.join(allowed)}")
    return ELEMENT_FORMATS[name]
