"""fakequant::observe_range (range tracking and quantization parameters) on every (device, backend) pair.

Every pair must write the same tracked range, scale and zero point bit for bit as the reference on the CPU, for
per-tensor and per-channel ranges, the moving average and the first observation, BN-folded weights, ReLU outputs,
any layout and dtype, and non-finite inputs (left out of the range: a tensor or channel without a finite element
keeps its tracked range, scale and zero point); a NaN tracked range gives a NaN scale and an INT32_MIN zero point
(the x86 float-to-int32 conversion the kernels reproduce); and raise the reference's ValueError for bad arguments
(docs/numerics.md, Range observation).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fakequant import _backend as fakequant_backend
from fakequant import reference
from fakequant.qparams import choose_qparams
from tests.ops._helpers import FLOATS, SCALE_MESSAGE, any_layouts, assert_bits_equal, on, seeded_qparams, special_values

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
OP = torch.ops.fakequant.observe_range
RANGES = [(-128, 127, True), (0, 255, False), (-8, 7, False), (0, 15, True), (-127, 127, True), (-32768, 32767, False)]


def _state(x, axis, tracked=None, state_dtype=torch.float32, zp_dtype=torch.int32):
    """Fresh ``(tracked_range, scale, zero_point)`` for ``x`` on ``x``'s device; ``tracked`` the previous range."""
    channels = None if axis is None else x.size(axis)
    shape = (2,) if channels is None else (2, channels)
    tracked = torch.zeros(shape) if tracked is None else tracked
    scale = torch.ones(() if channels is None else (channels,))
    zero_point = torch.zeros(() if channels is None else (channels,), dtype=zp_dtype)
    return tuple(t.to(device=x.device) for t in (tracked.to(state_dtype).clone(), scale.to(state_dtype), zero_point))


def _observe(fn, x, axis, constant, qrange, fold=None, tracked=None, state_dtype=torch.float32, zp_dtype=torch.int32,
             relu=False):
    """The state ``fn`` writes from a fresh one; the reference runs on CPU copies (the state is moved back)."""
    device = x.device
    if fn is reference.observe_range:
        x, fold = x.cpu(), None if fold is None else fold.cpu()
        tracked = None if tracked is None else tracked.cpu()
    elif fold is not None:
        fold = fold.to(device)
    state = _state(x, axis, None if tracked is None else tracked.to(x.device), state_dtype, zp_dtype)
    fn(x, *state, axis, constant, *qrange, fold, relu)
    return tuple(t.to(device) for t in state)


def _assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape and a.device == e.device
        assert torch.equal(a.isnan(), e.isnan()) if a.is_floating_point() else True
        finite = ~a.isnan() if a.is_floating_point() else torch.ones_like(a, dtype=torch.bool)
        assert torch.equal(a[finite], e[finite]), (a, e)


def check_observe(x, axis, constant, qrange, fold=None, tracked=None, state_dtype=torch.float32,
                  zp_dtype=torch.int32, relu=False):  # fmt: skip
    """The op and the reference on the same state, bit for bit; returns the op's."""
    got = _observe(OP, x, axis, constant, qrange, fold, tracked, state_dtype, zp_dtype, relu)
    want = _observe(reference.observe_range, x, axis, constant, qrange, fold, tracked, state_dtype, zp_dtype, relu)
    for a, e in zip(got, want, strict=True):
        if a.is_floating_point():
            assert_bits_equal(a, e)
        else:
            assert a.dtype == e.dtype and torch.equal(a, e), (a, e)
    return got


def _inputs(generator):
    yield torch.randn(7, generator=generator) * 3 + 1
    yield torch.randn(3, 5, 7, generator=generator).transpose(0, 2)  # non-contiguous
    yield torch.randn(16, 3, 3, 3, generator=generator).contiguous(memory_format=torch.channels_last)
    yield torch.randn(5, 33, 2, generator=generator)[:, ::2]  # strided slice
    yield torch.rand(4, 300, generator=generator) * 6  # non-negative (ReLU outputs)
    yield torch.full((2, 40), -0.5)  # one value: zero forced into the range
    yield torch.zeros(3, 50)  # all zero: the eps floor on the scale
    yield torch.randn(2, 70000, generator=generator)  # several parallel chunks


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


def test_reference_folded_weight_range_equals_direct_min_max():
    torch.manual_seed(0)
    weight = torch.randn(32, 5, 3, 3)
    gamma = torch.randn(32)
    gamma[3] = 0.0
    gamma[4] = -0.0
    factor = reference.bn_fold_factor(gamma, torch.rand(32) + 0.1, 1e-5)
    lo, hi = reference.batch_range(weight, 0, factor)
    folded = weight * factor.reshape(-1, 1, 1, 1)
    assert torch.equal(lo, folded.amin((1, 2, 3)))
    assert torch.equal(hi, folded.amax((1, 2, 3)))
    lo, hi = reference.batch_range(weight, None, factor)
    assert torch.equal(lo, folded.amin()) and torch.equal(hi, folded.amax())
    assert bool((factor < 0).any()) and bool((factor > 0).any())


# ---------------------------------------------------------------------------------------------
# Every pair against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qrange", RANGES, ids=lambda r: f"{r[0]}_{r[1]}_{'sym' if r[2] else 'aff'}")
@pytest.mark.parametrize("constant", [1.0, 0.01])
def test_matches_reference_bit_for_bit(device, qrange, constant):
    generator = torch.Generator().manual_seed(1)
    for x in _inputs(generator):
        x = x.to(device)
        for axis in [None, *range(x.dim())]:
            channels = 1 if axis is None else x.size(axis)
            tracked = torch.randn((2,) if axis is None else (2, channels), generator=generator)
            actual = _observe(OP, x, axis, constant, qrange, tracked=tracked)
            expected = _observe(reference.observe_range, x, axis, constant, qrange, tracked=tracked)
            _assert_same(actual, expected)


@pytest.mark.parametrize("axis", [None, 0])
def test_folded_range_matches_reference(device, axis):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(12, 5, 3, 3, generator=generator)
    fold = torch.randn(12, generator=generator)
    fold[3] = 0.0
    fold[4] = -0.0
    weight, fold = on(device, weight, fold)
    for qrange, x in itertools.product(RANGES[:3], [weight, weight.contiguous(memory_format=torch.channels_last)]):
        actual = _observe(OP, x, axis, 1.0, qrange, fold)
        expected = _observe(reference.observe_range, x, axis, 1.0, qrange, fold)
        _assert_same(actual, expected)
        folded = x * fold.reshape(-1, 1, 1, 1)
        low = folded.amin() if axis is None else folded.amin((1, 2, 3))
        high = folded.amax() if axis is None else folded.amax((1, 2, 3))
        assert torch.equal(actual[0][0], low) and torch.equal(actual[0][1], high)


@pytest.mark.parametrize("constant", [1.0, 0.01])
def test_relu_range_matches_reference_and_relu_of_x(device, constant):
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
        x = x.to(device)
        for qrange in RANGES[:3]:
            args = (x, axis, constant, qrange, case_fold, tracked)
            actual = _observe(OP, *args, relu=True)
            _assert_same(actual, _observe(reference.observe_range, *args, relu=True))
            # the same as observing relu(x) itself
            formed = torch.relu(x if case_fold is None else x * case_fold.to(device).reshape(-1, 1, 1, 1))
            _assert_same(actual, _observe(reference.observe_range, formed, axis, constant, qrange, None, tracked))
    x = (-torch.rand(3, 40, generator=generator) - 0.1).to(device)
    tracked = _observe(OP, x, None, 1.0, (0, 255, False), relu=True)[0]
    assert tracked.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision_inputs_and_state(device, x_dtype, state_dtype):
    # model.half() turns the range and scale buffers fp16 too; the zero point may be int64.
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 41, generator=generator) * 4).to(dtype=x_dtype, device=device)
    for axis, constant in itertools.product([None, 1], [1.0, 0.01]):
        tracked = torch.randn((2,) if axis is None else (2, 41), generator=generator)
        args = (x, axis, constant, (0, 255, False), None, tracked, state_dtype, torch.int64)
        _assert_same(_observe(OP, *args), _observe(reference.observe_range, *args))


def test_first_observation_replaces_and_later_ones_average(device):
    x = torch.tensor([-1.0, 3.0], device=device)
    tracked, scale, zero_point = _observe(OP, x, None, 1.0, (0, 255, False), tracked=torch.tensor([-50.0, 50.0]))
    assert tracked.tolist() == [-1.0, 3.0]
    expected_scale, expected_zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255, False)
    assert torch.equal(scale.cpu(), expected_scale) and torch.equal(zero_point.cpu(), expected_zp)
    OP(torch.tensor([-3.0, 7.0], device=device), tracked, scale, zero_point, None, 0.5, 0, 255, False)
    assert tracked.tolist() == [-2.0, 5.0]  # halfway, exactly representable


def test_nan_is_left_out_of_the_range(device):
    # One NaN (a transient fault) must not end a training run: the range is that of the finite elements, so the
    # scale stays usable.
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(device)
    x[417] = float("nan")
    tracked, scale, zero_point = check_observe(x, None, 1.0, (0, 255, False))
    finite = torch.cat([x[:417], x[418:]])
    assert tracked.tolist() == [finite.min().item(), finite.max().item()]
    assert bool(scale.isfinite()) and float(scale) > 0
    torch.ops.fakequant.fake_quant_per_tensor(x, scale, zero_point, 0, 255)  # does not raise


def test_infinities_are_left_out_of_the_range(device):
    x = torch.tensor([1.0, float("inf"), -2.0, float("-inf")], device=device)
    actual = check_observe(x, None, 1.0, (-128, 127, True))
    assert actual[0].tolist() == [-2.0, 1.0]


def test_nan_tracked_range_gives_a_nan_scale(device):
    # A NaN tracked range (not one this op wrote: a corrupt checkpoint) propagates through the moving average:
    # NaN scale, zero point INT32_MIN, which the next fake quantization rejects (on CPU tensors).
    x = torch.randn(100, generator=torch.Generator().manual_seed(0)).to(device)
    tracked = torch.tensor([float("nan"), 1.0])
    tracked, scale, zero_point = check_observe(x, None, 0.01, (0, 255, False), tracked=tracked)
    assert bool(tracked[0].isnan()) and bool(scale.isnan()) and zero_point.item() == -(2**31)
    if device == "cpu":
        with pytest.raises(ValueError, match=SCALE_MESSAGE + r", got nan"):
            torch.ops.fakequant.fake_quant_per_tensor(x, scale, torch.zeros((), dtype=torch.int32), 0, 255)


# ---------------------------------------------------------------------------------------------
# Small blocks: the paths of large tensors on small ones
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_observe_blocks(monkeypatch):
    """Blocks of 16 elements, up to 8 partial programs, one loop step minimum in the Triton kernels: small tensors
    then take the paths that only large ones take with the real sizes (several splits per channel combined in
    several finalize steps, several channel tiles and finalize programs, loops over channel blocks). The other
    backends do not read these (and without triton there is nothing to set)."""
    if fakequant_backend.load_triton_kernels() is None:
        return
    from fakequant.triton import observe as triton_observe

    monkeypatch.setattr(triton_observe, "OBSERVE_BLOCK_SIZE", 16)
    monkeypatch.setattr(triton_observe, "OBSERVE_PROGRAMS", 8)
    monkeypatch.setattr(triton_observe, "OBSERVE_MIN_STEPS", 1)


OBSERVE_MODES = [(1.0, (-128, 127, True)), (0.01, (0, 255, False)), (0.25, (-8, 7, False))]


def check_observe_every_layout_and_axis(x, gen, relu=False):
    """check_observe for every layout of x, per tensor and along every axis, cycling through OBSERVE_MODES with a
    random tracked range; returns (axis, averaging constant, the op's state) of each call."""
    results = []
    for i, xl in enumerate(any_layouts(x).values()):
        for j, axis in enumerate((None, *range(x.dim()))):
            constant, qrange = OBSERVE_MODES[(i + j) % len(OBSERVE_MODES)]
            tracked = torch.randn((2,) if axis is None else (2, x.size(axis)), generator=gen)
            results.append((axis, constant, check_observe(xl, axis, constant, qrange, tracked=tracked, relu=relu)))
    return results


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
def test_every_layout_dtype_and_axis(device, dtype, special, small_observe_blocks):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, 6, 5, 7, generator=gen) * 3 + 0.5
    if special:
        # One channel of each axis gets a NaN, others inf and -inf: per-channel ranges keep them apart.
        x[1, 2, 3, 4], x[2, 0, 0, 0], x[3, 5, 4, 6] = float("nan"), float("inf"), float("-inf")
    check_observe_every_layout_and_axis(x.to(dtype=dtype, device=device), gen)


def test_several_default_blocks(device):
    """The real block sizes: 15000 elements per tensor (4 splits), 5000 per row, 5000 channels of 3."""
    gen = torch.Generator().manual_seed(14)
    x = (torch.randn(3, 5000, generator=gen) * 2).to(device)
    x[2, 4321] = float("nan")
    for xl in (x, x.t().contiguous().t()):
        for axis in (None, 0, 1):
            tracked = torch.randn((2,) if axis is None else (2, x.size(axis)), generator=gen)
            check_observe(xl, axis, 0.01, (-128, 127, False), tracked=tracked)


def fold_weight_cases(gen, device, adjust=None):
    """A 40x3x3 weight and fold factors with the special ends of a folded range: a 0 minimum (channel 5) or
    maximum (9) times an infinite factor, inf times a 0 factor (11), and +-0 factors (3, 4). ``adjust(weight,
    fold)`` may change more channels before the variants are made. Returns the weight and the factors
    ``(plain, fold, only_low_nan, only_high_nan)`` on ``device``: no NaN, NaN from inf * 0, and NaN at only one
    end."""
    weight = torch.randn(40, 3, 3, generator=gen)
    weight[5] = weight[5].abs()
    weight[5, 1, 1] = 0.0  # min 0: times an infinite fold factor, a NaN minimum and an infinite maximum
    weight[9] = -weight[9].abs()
    weight[9, 2, 0] = 0.0  # max 0: the same for the maximum
    weight[11, 0, 2] = float("inf")
    fold = torch.randn(40, generator=gen)
    fold[3], fold[4], fold[11] = 0.0, -0.0, 0.0  # inf * 0: NaN
    if adjust is not None:
        adjust(weight, fold)
    weight, fold = weight.to(device), fold.to(device)
    plain = fold.clone()
    plain[11] = 2.0
    only_low_nan, only_high_nan = plain.clone(), plain.clone()
    only_low_nan[5] = float("inf")
    only_high_nan[9] = float("inf")
    return weight, (plain, fold, only_low_nan, only_high_nan)


def fold_observe_cases(weight, folds, gen):
    """(weight layout, axis, constant, qrange, fold, tracked) over every layout of ``weight``, every factor of
    ``folds``, per tensor and per channel, cycling through OBSERVE_MODES."""
    for i, wl in enumerate(any_layouts(weight).values()):
        for j, f in enumerate(folds):
            for axis in (None, 0):
                constant, qrange = OBSERVE_MODES[(i + j) % len(OBSERVE_MODES)]
                tracked = torch.randn((2,) if axis is None else (2, weight.size(0)), generator=gen)
                yield wl, axis, constant, qrange, f, tracked


def test_fold_special_ends(device, small_observe_blocks):
    gen = torch.Generator().manual_seed(15)
    weight, folds = fold_weight_cases(gen, device)
    _, _, only_low_nan, only_high_nan = folds
    for case in fold_observe_cases(weight, folds, gen):
        check_observe(*case)
    # Per tensor, NaN in one end of one channel's folded range (an infinite factor times 0) is no range: the
    # tracked range stays.
    tracked = torch.tensor([-1.5, 2.5])
    for f in (only_low_nan, only_high_nan):
        assert check_observe(weight, None, 1.0, (0, 255, False), f, tracked)[0].tolist() == [-1.5, 2.5]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_relu_every_layout_and_axis(device, dtype, small_observe_blocks):
    """relu=True: the range of relu(x), per tensor and per channel of every axis, in every layout, with NaN,
    +-inf, all-negative channels (range [0, 0]) and channels whose minimum only is negative."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(4, 6, 5, 7, generator=gen) * 3 + 0.5
    x[2] = -x[2].abs() - 0.25  # all negative along axis 0: [0, 0]
    x[:, :, 3] = -x[:, :, 3].abs() - 0.25  # and along axis 2
    x[0, 1, 1, 1], x[3, 4, 0, 2], x[1, 5, 4, 6] = float("nan"), float("inf"), float("-inf")
    x = x.to(dtype=dtype, device=device)
    for axis, constant, state in check_observe_every_layout_and_axis(x, gen, relu=True):
        if constant == 1.0 and axis in (0, 2):
            assert state[0][:, 2 if axis == 0 else 3].tolist() == [0.0, 0.0], state[0]
    # All negative (-inf included): [0, 0], replaced or moved towards; without relu the range is negative.
    negative = -(torch.rand(3, 5, generator=gen) + 0.5)
    negative[1, 2] = float("-inf")
    negative = negative.to(dtype=dtype, device=device)
    for axis in (None, 0, 1):
        for constant, qrange in OBSERVE_MODES:
            tracked = torch.randn((2,) if axis is None else (2, negative.size(axis)), generator=gen)
            state = check_observe(negative, axis, constant, qrange, tracked=tracked, relu=True)
            if constant == 1.0:
                assert not bool(state[0].any()) and not bool(state[0].signbit().any()), state[0]
        assert bool((check_observe(negative, axis, 1.0, (0, 255, False))[0] < 0).all())
    # NaN and +-inf per tensor: left out, the range is relu's of the finite elements'.
    state = check_observe(x, None, 1.0, (0, 255, False), relu=True)
    finite = x[x.isfinite()].float()
    assert state[0].tolist() == [max(finite.min().item(), 0.0), finite.max().item()]


def test_relu_signed_zeros(device_backend, small_observe_blocks):
    """-0.0 ends: torch.relu (the reference) keeps -0.0, and so must every kernel, bit for bit."""
    device, _ = device_backend
    x = torch.tensor([[-0.0, -0.0, -0.0], [-1.0, -0.0, -2.0], [-0.0, 0.0, 3.0]], device=device)
    for axis in (None, 0, 1):
        for constant, qrange in OBSERVE_MODES:
            check_observe(x, axis, constant, qrange, relu=True)
    state = check_observe(x, 0, 1.0, (0, 255, False), relu=True)
    assert state[0][:, 0].signbit().tolist() == [True, True] and state[0][1, 1].signbit()


def test_relu_fold(device, small_observe_blocks):
    """relu=True with a fold factor, per channel and per tensor: ReLU after the fold (a negative factor turns a
    positive channel negative, so to [0, 0]) and after the per-tensor range is combined over channels; inf * 0
    NaN stays NaN at either end."""
    gen = torch.Generator().manual_seed(18)

    def sign_flips(weight, fold):
        weight[20] = weight[20].abs() + 0.5  # positive: [0, 0] after a negative factor
        weight[21] = -weight[21].abs() - 0.5  # negative: positive after a negative factor, [0, 0] after a positive
        fold[20], fold[21] = -1.5, 0.75

    weight, folds = fold_weight_cases(gen, device, sign_flips)
    _, fold, only_low_nan, only_high_nan = folds
    all_negative = -(fold.abs() + 0.5)  # with a positive weight: every folded value negative
    for wl, axis, constant, qrange, f, tracked in fold_observe_cases(weight, folds, gen):
        state = check_observe(wl, axis, constant, qrange, f, tracked, relu=True)
        if constant == 1.0 and axis == 0:
            assert state[0][:, 20].tolist() == [0.0, 0.0] and state[0][:, 21].tolist() == [0.0, 0.0]
    # Per tensor: a NaN end (inf * 0) is no range, with relu too: the tracked range stays.
    tracked = torch.tensor([0.5, 2.5])
    for f in (only_low_nan, only_high_nan):
        assert check_observe(weight, None, 1.0, (0, 255, False), f, tracked, relu=True)[0].tolist() == [0.5, 2.5]
    # A positive weight times negative factors: every folded value negative, [0, 0] per tensor and per channel.
    positive = weight.abs() + 0.25
    for axis in (None, 0):
        for constant, qrange in OBSERVE_MODES:
            tracked = torch.randn((2,) if axis is None else (2, 40), generator=gen)
            state = check_observe(positive, axis, constant, qrange, all_negative, tracked, relu=True)
            if constant == 1.0:
                assert not bool(state[0].any()), state[0]


def test_state_dtypes_and_strides(device, small_observe_blocks):
    """State after model.half() (fp16/bf16 range and scale, int64 zero point) in strided views: only the
    viewed elements change."""
    gen = torch.Generator().manual_seed(16)
    x = (torch.randn(5, 9, generator=gen) * 4).to(device)
    for state_dtype, zp_dtype in ((torch.float16, torch.int64), (torch.bfloat16, torch.int32)):
        for axis in (None, 1):
            channels = 1 if axis is None else 9
            tracked_base = torch.full((channels, 3), 7.0, dtype=state_dtype, device=device)
            tracked_base[:, 0] = torch.randn(channels, generator=gen).to(state_dtype)
            tracked_base[:, 2] = torch.randn(channels, generator=gen).to(state_dtype)
            tracked = tracked_base[:, ::2].t()  # (2, channels), strides (1, 3)
            scale_base = torch.full((2 * channels,), 7.0, dtype=state_dtype, device=device)
            zp_base = torch.full((channels, 2), 7, dtype=zp_dtype, device=device)
            scale, zero_point = scale_base[::2], zp_base[:, 1]
            if axis is None:
                tracked, scale, zero_point = tracked.reshape(2), scale.reshape(()), zero_point.reshape(())
            want = tuple(t.cpu().clone() for t in (tracked, scale, zero_point))
            OP(x, tracked, scale, zero_point, axis, 0.01, 0, 255, False)
            reference.observe_range(x.cpu(), *want, axis, 0.01, 0, 255, False)
            for a, e in zip((tracked, scale, zero_point), want, strict=True):
                if a.is_floating_point():
                    assert_bits_equal(a.cpu(), e)
                else:
                    assert a.dtype == e.dtype and torch.equal(a.cpu(), e), (a, e)
            assert bool((tracked_base[:, 1] == 7).all() and (scale_base[1::2] == 7).all())
            assert bool((zp_base[:, 0] == 7).all())
    # A NaN range (a NaN tracked range moved towards the batch's): INT32_MIN in an int64 zero point too
    # (sign-extended, as the reference's int32 copy).
    tracked = torch.tensor([float("nan"), 1.0])
    state = check_observe(x, None, 0.01, (0, 255, False), tracked=tracked, state_dtype=torch.float16,
                          zp_dtype=torch.int64)  # fmt: skip
    assert state[2].item() == -(2**31) and bool(state[1].isnan())


# ---------------------------------------------------------------------------------------------
# Non-finite inputs: left out of the range; no finite element keeps the tracked state
# ---------------------------------------------------------------------------------------------

NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def _sprinkle(x, gen, fraction=0.1):
    """x with NaN, +inf and -inf at random positions (about ``fraction`` of the elements)."""
    x = x.clone()
    where = torch.rand(x.shape, generator=gen) < fraction
    which = torch.randint(0, 3, x.shape, generator=gen)
    for k, value in enumerate(NON_FINITE):
        x[where & (which == k)] = value
    return x


def _finite_range(x, axis):
    """(min, max) of x's finite elements in fp32, per tensor or per channel of ``axis``; (+inf, -inf) if none."""
    xf = x.float()
    finite = xf.isfinite()
    low = torch.where(finite, xf, float("inf"))
    high = torch.where(finite, xf, float("-inf"))
    if axis is None:
        return low.amin(), high.amax()
    dims = [d for d in range(x.dim()) if d != axis]
    return low.amin(dims), high.amax(dims)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_non_finite_values_are_left_out(device, dtype, relu, small_observe_blocks):
    """NaN, +inf and -inf sprinkled in: per tensor and per channel (every axis and layout, channels_last
    included), replace and moving average: the range of the finite elements, bit for bit as the reference."""
    gen = torch.Generator().manual_seed(21)
    x = _sprinkle(torch.randn(4, 6, 5, 7, generator=gen) * 3 + 0.5, gen).to(dtype)
    results = check_observe_every_layout_and_axis(x.to(device), gen, relu=relu)
    for axis, constant, state in results:
        assert bool(state[0].isfinite().all()) and bool(state[1].isfinite().all())
        if constant == 1.0:
            low, high = _finite_range(x, axis)
            if relu:
                low, high = torch.relu(low), torch.relu(high)
            assert_bits_equal(state[0].cpu(), torch.stack([low, high]))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("constant", [1.0, 0.25])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_no_finite_element_keeps_the_state(device, dtype, constant, relu):
    """A tensor of NaN and +-inf only leaves the tracked range, scale and zero point as they were, per tensor
    and per channel, folded or not."""
    gen = torch.Generator().manual_seed(22)
    x = torch.tensor(NON_FINITE)[torch.randint(0, 3, (6, 4, 3, 3), generator=gen)]
    x = x.to(dtype=dtype, device=device)
    fold = torch.tensor([1.5, -2.0, 0.0, -0.0, 0.5, 3.0])
    for xl, axis, f in itertools.product((x, x.contiguous(memory_format=torch.channels_last)), (None, 0, 1),
                                         (None, fold)):  # fmt: skip
        if f is not None and axis == 1:
            continue
        channels = 1 if axis is None else x.size(axis)
        shape = (2,) if axis is None else (2, channels)
        tracked = torch.stack([-torch.rand(shape[1:], generator=gen), torch.rand(shape[1:], generator=gen)])
        # The state an earlier observation wrote: scale and zero point chosen from the tracked range.
        scale, zero_point = choose_qparams(tracked[0], tracked[1], -128, 127, False)
        zero_point = zero_point.to(torch.int32)
        before = [t.to(device) for t in (tracked, scale, zero_point)]
        state = [t.clone() for t in before]
        OP(xl, *state, axis, constant, -128, 127, False, None if f is None else f.to(device), relu)
        for a, b in zip(state, before, strict=True):
            assert torch.equal(a, b), (axis, f, a, b)
        check_observe(xl, axis, constant, (-128, 127, False), f, tracked, relu=relu)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("constant", [1.0, 0.25])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_channel_without_finite_element_keeps_its_state(device, dtype, constant, relu, small_observe_blocks):
    """One channel of NaN and +-inf only keeps its tracked range, scale and zero point while the others update;
    with a fold factor (positive, negative, +-0: inf * 0 would be NaN) per channel, and per tensor, where the
    channel drops out of the range."""
    gen = torch.Generator().manual_seed(23)
    base = torch.randn(6, 4, 3, 3, generator=gen) * 2
    fold = torch.tensor([1.5, -2.0, 0.0, -0.0, 0.5, -0.75])
    for empty in range(6):
        x = _sprinkle(base, gen, 0.05)
        x[empty] = torch.tensor(NON_FINITE)[torch.randint(0, 3, (4, 3, 3), generator=gen)]
        x = x.to(dtype=dtype, device=device)
        for xl, f in itertools.product((x, x.contiguous(memory_format=torch.channels_last)), (None, fold)):
            tracked = torch.stack([-torch.rand(6, generator=gen), torch.rand(6, generator=gen)])
            state = check_observe(xl, 0, constant, (0, 255, False), f, tracked, relu=relu)
            assert torch.equal(state[0][:, empty].cpu(), tracked[:, empty])
            others = [c for c in range(6) if c != empty]
            assert bool((state[0][:, others].cpu() != tracked[:, others]).any())
            # Per tensor: the empty channel drops out (folded or not).
            per_tensor = check_observe(xl, None, constant, (0, 255, False), f, tracked[:, 0], relu=relu)[0]
            low, high = _finite_range(x.cpu(), None) if f is None else reference.batch_range(x.cpu(), None, f)
            if relu:
                low, high = torch.relu(low), torch.relu(high)
            if constant == 1.0:
                assert_bits_equal(per_tensor.cpu(), torch.stack([low, high]).float())
        # Along axis 1 every channel has finite elements from the other rows.
        check_observe(x, 1, constant, (0, 255, False), relu=relu)


# ---------------------------------------------------------------------------------------------
# Larger inputs: per tensor, per channel and folded, with ReLU
# ---------------------------------------------------------------------------------------------

# (axis, averaging_constant, fold): per tensor, per channel, and a folded weight's range per channel and
# per tensor (combined over the channels).
OBSERVE_CASES = [(None, 1.0, False), (None, 0.01, False), (1, 1.0, False), (0, 0.01, True), (None, 1.0, True)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis, constant, fold", OBSERVE_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_matches_reference_per_tensor_per_channel_and_folded(device, dtype, axis, constant, fold, relu):
    generator = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 7, 300, generator=generator) * 3).to(dtype).to(device)
    tracked = torch.randn((2, x.size(axis)) if axis is not None else (2,), generator=generator)
    folds = torch.randn(5, generator=generator).to(device) if fold else None
    for quant_range in [(-128, 127, True), (0, 255, False)]:
        check_observe(x, axis, constant, quant_range, folds, tracked, relu=relu)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis, constant, fold", OBSERVE_CASES)
def test_relu_all_negative_and_nan(device, dtype, axis, constant, fold):
    generator = torch.Generator().manual_seed(5)
    negative = -(torch.rand(5, 7, 300, generator=generator) * 3 + 0.5)
    with_nan = torch.randn(5, 7, 300, generator=generator) * 3
    with_nan[1, 2, 17] = float("nan")  # channel 1 along axis 0 (the fold's), channel 2 along axis 1
    # Positive factors keep x * fold negative; mixed signs make some of it positive, which a ReLU applied
    # before the fold instead of after it would miss.
    positive_folds = torch.rand(5, generator=generator) + 0.5
    mixed_folds = torch.randn(5, generator=generator)
    mixed_folds[1] = -mixed_folds[1].abs()
    cases = [(negative, positive_folds, True), (negative, mixed_folds, False), (with_nan, mixed_folds, False)]
    if not fold:
        cases = [(negative, None, True), (with_nan, None, False)]
    tracked = torch.randn((2, negative.size(axis)) if axis is not None else (2,), generator=generator)
    for (x, folds, zero_range), quant_range in itertools.product(cases, [(-128, 127, True), (0, 255, False)]):
        got = check_observe(x.to(dtype).to(device), axis, constant, quant_range, folds, tracked, relu=True)
        if zero_range and constant == 1.0:
            assert torch.equal(got[0], torch.zeros_like(got[0]))  # relu(x)'s range: [0, 0]
        if x is with_nan:
            assert bool(got[0].isfinite().all())  # the NaN is left out


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


def test_opcheck(device):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 4, 5, generator=g) * 2).to(device)
    gamma = torch.randn(3, generator=g).to(device)
    samples = [
        (x, torch.zeros(2), torch.ones(()), torch.zeros((), dtype=torch.int32), None, 1.0, 0, 255, False),
        (x, torch.randn(2, 4, generator=g), torch.ones(4), torch.zeros(4, dtype=torch.int64), 1, 0.01, -128, 127,
         True),
        (x, torch.zeros(2), torch.ones(1), torch.zeros(1, dtype=torch.int32), None, 1.0, -8, 7, True, gamma),
        (x.transpose(0, 2), torch.randn(2, 4, generator=g), torch.ones(4), torch.zeros(4, dtype=torch.int32), 1, 0.01,
         -8, 7, False, None, True),
    ]  # fmt: skip
    for args in samples:
        torch.library.opcheck(OP.default, on(device, *args))
    x = special_values((4, 3, 5, 7), 0.05, device=device).nan_to_num(0.0, 1.0, -1.0)
    scales, zps = seeded_qparams(3, device=device)
    for xl in (x, x.contiguous(memory_format=torch.channels_last)):
        state = (torch.randn(2, 3, generator=g).to(device), scales.clone(), zps.clone())
        torch.library.opcheck(OP, (xl, *state, 1, 0.01, -128, 127, True))


# ---------------------------------------------------------------------------------------------
# Bad arguments: the reference's ValueError on every pair
# ---------------------------------------------------------------------------------------------

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
def test_bad_arguments_raise_the_same_error(device, changes, message):
    args = dict(x=torch.randn(3, 5), tracked_range=torch.zeros(2), scale=torch.ones(()),
                zero_point=torch.zeros((), dtype=torch.int32), axis=None, averaging_constant=1.0, quant_min=0,
                quant_max=255, symmetric=False, fold=None)
    args.update(changes)
    with pytest.raises(ValueError, match=message):
        reference.observe_range(*args.values())
    with pytest.raises(ValueError, match=message):
        OP(*on(device, *args.values()))


# ---------------------------------------------------------------------------------------------
# Smoke cases: tools/kernel_smoke.py runs them on a GPU, under compute-sanitizer too.
# ---------------------------------------------------------------------------------------------


def smoke_cases(inp):
    """This op's cases for tools/kernel_smoke.py (each kernel path once, under compute-sanitizer on a GPU)."""
    x = inp.x
    if x.numel() == 0:
        return  # observe_range of an empty tensor is an error (no range to observe)
    finite = x.nan_to_num(0.0, 1.0, -1.0)
    for axis, constant, fold, relu in ((None, 1.0, False, False), (None, 0.01, False, True),
                                       (1, 1.0, False, False), (0, 0.01, True, False)):  # fmt: skip
        if (axis == 1 or fold) and x.dim() < 2:
            continue
        channels = 1 if axis is None else x.size(axis)
        tracked = inp.on(torch.randn((2, channels) if axis is not None else (2,), generator=inp.generator))
        scale = inp.on(torch.ones(channels if axis is not None else ()))
        zero_point = inp.on(torch.zeros(channels if axis is not None else (), dtype=torch.int32))
        folds = inp.rand(x.size(0)) + 0.5 if fold else None
        args = (finite, tracked, scale, zero_point, axis, constant, -128, 127, True, folds, relu)
        yield f"axis={axis} c={constant} fold={fold} relu={relu}", "observe_range", args
