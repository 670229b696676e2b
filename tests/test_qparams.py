"""Quantization parameters (docs/numerics.md, Quantization parameters) against torch.ao's observers, the quantization
ranges and spec validation, and the backend name check."""

from __future__ import annotations

import itertools

import pytest
import torch

import fakequant
from fakequant.qparams import quant_range

# ---------------------------------------------------------------------------------------------
# Quantization parameters against torch.ao's observers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric,signed", list(itertools.product([True, False], [True, False])))
def test_choose_qparams_matches_observers(symmetric, signed):
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    quant_min, quant_max = quant_range(8, signed=signed)
    dtype = torch.qint8 if signed else torch.quint8
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    g = torch.Generator().manual_seed(9)
    for shift in (-3.0, 0.0, 2.0):
        x = torch.randn(1000, generator=g) + shift
        # The default 8-bit ranges: with a custom range torch.ao puts the unsigned symmetric zero point
        # at (qmin + qmax) // 2 = 127, without one at 128 = (qmin + qmax + 1) // 2, which docs/numerics.md follows.
        observer = MinMaxObserver(dtype=dtype, qscheme=qscheme)
        observer(x)
        expected_scale, expected_zp = observer.calculate_qparams()
        scale, zp = fakequant.choose_qparams(x.min(), x.max(), quant_min, quant_max, symmetric)
        torch.testing.assert_close(scale, expected_scale.reshape(()), rtol=1e-6, atol=0)
        assert int(zp) == int(expected_zp)

    channel_scheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    w = torch.randn(6, 10, generator=g) + torch.linspace(-2, 2, 6)[:, None]
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=dtype, qscheme=channel_scheme)
    observer(w)
    expected_scale, expected_zp = observer.calculate_qparams()
    scale, zp = fakequant.choose_qparams(w.amin(1), w.amax(1), quant_min, quant_max, symmetric)
    torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
    assert torch.equal(zp.long(), expected_zp.long())


def test_choose_qparams_all_zero_is_finite():
    for symmetric in (True, False):
        scale, zp = fakequant.choose_qparams(torch.zeros(3), torch.zeros(3), -128, 127, symmetric)
        assert torch.all(scale == torch.finfo(torch.float32).eps)
        out = fakequant.fake_quant_per_channel(torch.zeros(3, 2), scale, zp, 0, -128, 127)
        assert torch.equal(out, torch.zeros(3, 2))


@pytest.mark.parametrize("symmetric", [True, False])
def test_choose_qparams_never_gives_a_scale_the_ops_reject(symmetric):
    """Ranges of subnormal and tiny widths still give a scale of at least eps (2^-23), far above the smallest normal
    fp32 (2^-126) below which the ops reject a scale; the ops then accept it."""
    tiny = torch.tensor([1e-45, 1e-40, 2.0**-126, 1e-30, 1e-8])
    for low, high in ((-tiny, tiny), (torch.zeros(5), tiny), (-tiny, torch.zeros(5))):
        scale, zero_point = fakequant.choose_qparams(low, high, -128, 127, symmetric)
        assert bool((scale >= torch.finfo(torch.float32).tiny).all()) and bool((scale >= 2.0**-23).all())
        fakequant.fake_quant_per_channel(torch.zeros(5, 3), scale, zero_point.to(torch.int32), 0, -128, 127)


def test_quant_range_and_spec_validation():
    assert quant_range(1) == (-1, 0)
    assert quant_range(16, signed=False) == (0, 65535)
    assert quant_range(4, narrow_range=True) == (-7, 7)
    for bad in (0, 17, 8.0, True):
        with pytest.raises(ValueError, match="bits must be an int from 1 to 16"):
            quant_range(bad)
    with pytest.raises(ValueError, match="granularity must be PerTensor"):
        fakequant.QuantSpec(granularity="per_channel")
    with pytest.raises(ValueError, match="axis must be an int"):
        fakequant.PerChannel(axis="0")


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown backend 'gpu'; valid backends: auto"):
        fakequant.set_backend("gpu")
