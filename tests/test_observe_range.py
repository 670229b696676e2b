"""The observe_range op (range tracking and quantization parameters) against reference.observe_range.

Every backend must write the same tracked range, scale and zero point bit for bit, for per-tensor and
per-channel ranges, the moving average and the first observation, BN-folded weights, any layout and dtype,
and NaN; and raise the reference's ValueError for bad arguments. (CUDA tests of the same op are in
tests/test_cuda.py's generic parametrization over the ops, where a GPU exists.)
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fakequant import reference
from fakequant.qparams import choose_qparams

RANGES = [(-128, 127, True), (0, 255, False), (-8, 7, False), (0, 15, True), (-127, 127, True), (-32768, 32767, False)]


def _state(x, axis, tracked=None, state_dtype=torch.float32, zp_dtype=torch.int32):
    channels = None if axis is None else x.size(axis)
    shape = (2,) if channels is None else (2, channels)
    tracked = torch.zeros(shape) if tracked is None else tracked
    scale = torch.ones(() if channels is None else (channels,))
    zero_point = torch.zeros(() if channels is None else (channels,), dtype=zp_dtype)
    return tracked.to(state_dtype).clone(), scale.to(state_dtype), zero_point


def _observe(fn, x, axis, constant, qrange, fold=None, tracked=None, state_dtype=torch.float32, zp_dtype=torch.int32,
             relu=False):
    state = _state(x, axis, tracked, state_dtype, zp_dtype)
    fn(x, *state, axis, constant, *qrange, fold, relu)
    return state


def _assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a.isnan(), e.isnan()) if a.is_floating_point() else True
        finite = ~a.isnan() if a.is_floating_point() else torch.ones_like(a, dtype=torch.bool)
        assert torch.equal(a[finite], e[finite]), (a, e)


def _inputs(generator):
    yield torch.randn(7, generator=generator) * 3 + 1
    yield torch.randn(3, 5, 7, generator=generator).transpose(0, 2)  # non-contiguous
    yield torch.randn(16, 3, 3, 3, generator=generator).contiguous(memory_format=torch.channels_last)
    yield torch.randn(5, 33, 2, generator=generator)[:, ::2]  # strided slice
    yield torch.rand(4, 300, generator=generator) * 6  # non-negative (ReLU outputs)
    yield torch.full((2, 40), -0.5)  # one value: zero forced into the range
    yield torch.zeros(3, 50)  # all zero: the eps floor on the scale
    yield torch.randn(2, 70000, generator=generator)  # several parallel chunks


@pytest.mark.parametrize("qrange", RANGES, ids=lambda r: f"{r[0]}_{r[1]}_{'sym' if r[2] else 'aff'}")
@pytest.mark.parametrize("constant", [1.0, 0.01])
def test_matches_reference_bit_for_bit(backend, qrange, constant):
    op = torch.ops.fakequant.observe_range
    generator = torch.Generator().manual_seed(1)
    for x in _inputs(generator):
        for axis in [None, *range(x.dim())]:
            channels = 1 if axis is None else x.size(axis)
            tracked = torch.randn((2,) if axis is None else (2, channels), generator=generator)
            actual = _observe(op, x, axis, constant, qrange, tracked=tracked)
            expected = _observe(reference.observe_range, x, axis, constant, qrange, tracked=tracked)
            _assert_same(actual, expected)


@pytest.mark.parametrize("axis", [None, 0])
def test_folded_range_matches_reference(backend, axis):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(12, 5, 3, 3, generator=generator)
    fold = torch.randn(12, generator=generator)
    fold[3] = 0.0
    fold[4] = -0.0
    for qrange, x in itertools.product(RANGES[:3], [weight, weight.contiguous(memory_format=torch.channels_last)]):
        actual = _observe(torch.ops.fakequant.observe_range, x, axis, 1.0, qrange, fold)
        expected = _observe(reference.observe_range, x, axis, 1.0, qrange, fold)
        _assert_same(actual, expected)
        folded = x * fold.reshape(-1, 1, 1, 1)
        low = folded.amin() if axis is None else folded.amin((1, 2, 3))
        high = folded.amax() if axis is None else folded.amax((1, 2, 3))
        assert torch.equal(actual[0][0], low) and torch.equal(actual[0][1], high)


@pytest.mark.parametrize("constant", [1.0, 0.01])
def test_relu_range_matches_reference_and_relu_of_x(backend, constant):
    """relu=True observes relu(x) (or relu(x * fold)) without forming it."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(12, 5, 3, 3, generator=generator)
    fold = torch.randn(12, generator=generator)
    with_nan = torch.randn(3, 40, generator=generator)
    with_nan[1, 7] = float("nan")
    cases = [(x, axis, None) for x in _inputs(generator) for axis in (None, x.dim() - 1)]
    cases += [(-torch.rand(3, 40, generator=generator) - 0.1, None, None),  # all negative: [0, 0]
              (with_nan, None, None), (with_nan, 0, None), (weight, None, fold), (weight, 0, fold)]
    for x, axis, case_fold in cases:
        channels = 1 if axis is None else x.size(axis)
        tracked = torch.rand((2,) if axis is None else (2, channels), generator=generator)
        for qrange in RANGES[:3]:
            args = (x, axis, constant, qrange, case_fold, tracked)
            actual = _observe(torch.ops.fakequant.observe_range, *args, relu=True)
            _assert_same(actual, _observe(reference.observe_range, *args, relu=True))
            # the same as observing relu(x) itself
            formed = torch.relu(x if case_fold is None else x * case_fold.reshape(-1, 1, 1, 1))
            _assert_same(actual, _observe(reference.observe_range, formed, axis, constant, qrange, None, tracked))
    x = -torch.rand(3, 40, generator=generator) - 0.1
    tracked = _observe(torch.ops.fakequant.observe_range, x, None, 1.0, (0, 255, False), relu=True)[0]
    assert tracked.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision_inputs_and_state(backend, x_dtype, state_dtype):
    # model.half() turns the range and scale buffers fp16 too; the zero point may be int64.
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 41, generator=generator) * 4).to(x_dtype)
    for axis, constant in itertools.product([None, 1], [1.0, 0.01]):
        tracked = torch.randn((2,) if axis is None else (2, 41), generator=generator)
        args = (x, axis, constant, (0, 255, False), None, tracked, state_dtype, torch.int64)
        _assert_same(_observe(torch.ops.fakequant.observe_range, *args), _observe(reference.observe_range, *args))


def test_first_observation_replaces_and_later_ones_average(backend):
    x = torch.tensor([-1.0, 3.0])
    tracked, scale, zero_point = _observe(torch.ops.fakequant.observe_range, x, None, 1.0, (0, 255, False),
                                          tracked=torch.tensor([-50.0, 50.0]))
    assert tracked.tolist() == [-1.0, 3.0]
    expected_scale, expected_zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, False)
    assert torch.equal(scale, expected_scale) and torch.equal(zero_point, expected_zp)
    torch.ops.fakequant.observe_range(torch.tensor([-3.0, 7.0]), tracked, scale, zero_point, None, 0.5, 0, 255, False)
    assert tracked.tolist() == [-2.0, 5.0]  # halfway, exactly representable


def test_nan_propagates_to_the_scale(backend):
    # A diverging run must stay visible: the range and scale become NaN, so the next fake quant raises.
    x = torch.randn(1000)
    x[417] = float("nan")
    tracked, scale, _ = _observe(torch.ops.fakequant.observe_range, x, None, 1.0, (0, 255, False))
    assert bool(tracked.isnan().all()) and bool(scale.isnan())
    with pytest.raises(ValueError, match="scale must be finite and > 0, got nan"):
        torch.ops.fakequant.fake_quant_per_tensor(x, scale, torch.zeros((), dtype=torch.int32), 0, 255)


def test_infinities_give_an_infinite_range(backend):
    x = torch.tensor([1.0, float("inf"), -2.0])
    actual = _observe(torch.ops.fakequant.observe_range, x, None, 1.0, (-128, 127, True))
    _assert_same(actual, _observe(reference.observe_range, x, None, 1.0, (-128, 127, True)))
    assert actual[0].tolist() == [-2.0, float("inf")]


BAD = [
    (dict(x=torch.empty(0, 3)), r"cannot observe the range of an empty tensor \(x has shape \(0, 3\)\)"),
    (dict(x=torch.ones(3, dtype=torch.int64)), r"x has dtype torch.int64; allowed: float32, float16, bfloat16"),
    (dict(quant_min=5, quant_max=5), r"choosing a scale needs quant_min < quant_max, got 5 == 5"),
    (dict(quant_min=7, quant_max=-8), r"quant_min \(7\) must be <= quant_max \(-8\)"),
    (dict(averaging_constant=0.0), r"averaging_constant must be in \(0, 1\] \(1 replaces the tracked range\), got 0.0"),
    (dict(averaging_constant=1.5), r"averaging_constant must be in \(0, 1\].*got 1.5"),
    (dict(axis=2), r"axis 2 is out of range for a tensor with 2 dimensions \(allowed: -2 to 1\)"),
    (dict(tracked_range=torch.zeros(3)), r"tracked_range must have shape \(2,\) \(\[min, max\]\), got \(3,\)"),
    (dict(axis=1), r"tracked_range must have shape \(2, 5\) \(\[min, max\] per channel\), got \(2,\)"),
    (dict(tracked_range=torch.zeros(2, dtype=torch.int32)), r"tracked_range has dtype torch.int32; allowed"),
    (dict(scale=torch.ones(2)), r"per-tensor scale must have exactly one element, got shape \(2,\)"),
    (dict(zero_point=torch.zeros(())), r"zero_point has dtype torch.float32; allowed: int32, int64"),
    (dict(fold=torch.ones(4)), r"fold must be a 1-D float32 tensor with 3 elements \(x.size\(0\)\), got torch.float32 "
                               r"of shape \(4,\)"),
    (
        dict(fold=torch.ones(3), axis=1, tracked_range=torch.zeros(2, 5), scale=torch.ones(5),
             zero_point=torch.zeros(5, dtype=torch.int32)),
        r"a fold factor applies along axis 0; allowed axis: None or 0",
    ),
]


@pytest.mark.parametrize("changes, message", BAD, ids=range(len(BAD)))
def test_bad_arguments_raise_the_same_error(backend, changes, message):
    args = dict(x=torch.randn(3, 5), tracked_range=torch.zeros(2), scale=torch.ones(()),
                zero_point=torch.zeros((), dtype=torch.int32), axis=None, averaging_constant=1.0, quant_min=0,
                quant_max=255, symmetric=False, fold=None)
    args.update(changes)
    for fn in (torch.ops.fakequant.observe_range, reference.observe_range):
        with pytest.raises(ValueError, match=message):
            fn(*args.values())
