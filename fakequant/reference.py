"""Pure-PyTorch reference implementations: the oracle every kernel is tested against.

Each function computes an op's results with plain tensor ops and no autograd (``*_forward`` returns
``(out, mask)``). They are each op's ``"default"`` kernel (the fallback on any device, and the ``"reference"``
backend) and "the pure-PyTorch composition" the benchmarks compare against. What they compute is specified in
docs/numerics.md; the argument checks they share with every backend are in :mod:`fakequant.checks`.

Example:
    >>> import torch
    >>> from fakequant import reference
    >>> reference.fake_quant_per_tensor_forward(torch.tensor([0.04, 0.06, 1.0]), torch.tensor(0.1),
    ...                                         torch.tensor(0), -8, 7)
    (tensor([0.0000, 0.1000, 0.7000]), tensor([ True,  True, False]))
"""

from __future__ import annotations

import torch

from fakequant.checks import (
    NVFP4_SMALLEST_PER_TENSOR_SCALE,
    check_binarize_args,
    check_bn_fold_args,
    check_bn_fold_backward_args,
    check_fake_quant_args,
    check_fp8_args,
    check_learnable_args,
    check_learnable_backward_args,
    check_mask,
    check_mx_args,
    check_nvfp4_args,
    check_observe_range_args,
    check_per_group_args,
)
from fakequant.formats import ELEMENT_FORMATS, ElementFormat
from fakequant.qparams import choose_qparams

__all__ = [
    "batch_range",
    "binarize_forward",
    "bn_fold_factor",
    "bn_fold_fake_quant_weight_backward",
    "bn_fold_fake_quant_weight_forward",
    "bn_fold_training_factor",
    "channel_view",
    "fake_quant_learnable_backward",
    "fake_quant_fp8_forward",
    "fake_quant_learnable_forward",
    "fake_quant_mx_forward",
    "fake_quant_nvfp4_forward",
    "fake_quant_per_channel_forward",
    "fake_quant_per_group_forward",
    "fake_quant_per_tensor_forward",
    "fake_quant_values",
    "fp8_scale_from_amax",
    "learnable_zero_point",
    "masked_grad",
    "mx_scales",
    "nvfp4_per_tensor_scale",
    "observe_range",
    "per_group_view",
    "round_to_element",
]


# ---------------------------------------------------------------------------------------------
# Forward values: the pure-PyTorch composition.
# ---------------------------------------------------------------------------------------------


def _empty_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.bool, device=x.device)


def channel_view(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def fake_quant_values(
    xf: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    compute_mask: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantizes fp32 ``xf`` with broadcastable fp32 ``scale`` and ``zero_point``."""
    inv_scale = 1.0 / scale
    zp = zero_point.to(torch.float32)
    q = torch.round(xf * inv_scale) + zp
    out = ((q.clamp(quant_min, quant_max) - zp) * scale).to(out_dtype)
    mask = ((q >= quant_min) & (q <= quant_max)) if compute_mask else _empty_mask(xf)
    return out, mask


def fake_quant_per_tensor_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    compute_mask: bool = True,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``relu=True`` fake-quantizes ``relu(x)`` and its mask also holds ReLU's gradient, ``x > 0``."""
    check_fake_quant_args(x, scale, zero_point, quant_min, quant_max)
    xf = x.float()
    out, mask = fake_quant_values(
        torch.relu(xf) if relu else xf, scale.reshape(()), zero_point.reshape(()), quant_min, quant_max,
        compute_mask, x.dtype,
    )
    if relu and compute_mask:
        mask = mask & (xf > 0)
    return out, mask


def fake_quant_per_channel_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    compute_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    axis = check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis)
    return fake_quant_values(
        x.float(),
        channel_view(scale, axis, x.dim()),
        channel_view(zero_point, axis, x.dim()),
        quant_min,
        quant_max,
        compute_mask,
        x.dtype,
    )


def binarize_forward(
    x: torch.Tensor, clipped_ste: bool = True, compute_mask: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``+1`` where ``x >= 0`` (0 included), ``-1`` below, NaN stays NaN; mask ``|x| <= 1``."""
    check_binarize_args(x)
    xf = x.float()
    out = torch.where(xf >= 0, 1.0, -1.0)
    out = torch.where(torch.isnan(xf), xf, out).to(x.dtype)
    mask = (xf.abs() <= 1) if (clipped_ste and compute_mask) else _empty_mask(x)
    return out, mask


def bn_fold_factor(gamma: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """The per-channel BN scale ``gamma / sqrt(var + eps)`` in fp32."""
    return gamma.float() / torch.sqrt(var.float() + eps)


def bn_fold_training_factor(gamma: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """The fold factor of ``divide_by_fold=True``: :func:`bn_fold_factor`, with 1 where it is 0 (``gamma == 0``).

    ``q(w * f) / f`` is undefined where ``f == 0``; those channels are quantized unfolded (a zero-initialised
    residual BN multiplies their conv output by 0 anyway).
    """
    factor = bn_fold_factor(gamma, var, eps)
    return factor.masked_fill_(factor == 0, 1.0)


def bn_fold_fake_quant_weight_forward(
    weight: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    compute_mask: bool = True,
    divide_by_fold: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q(w * f)`` per output channel; ``divide_by_fold=True`` returns ``q(w * f) / f`` (in fp32, rounded to
    the weight's dtype once) with ``f`` from :func:`bn_fold_training_factor`: the weight a training conv
    convolves with so that BN sees the float conv's output up to quantization noise."""
    check_bn_fold_args(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max)
    return _bn_fold_values(
        weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, compute_mask, divide_by_fold
    )


def _bn_fold_values(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, compute_mask, divide_by_fold):
    """:func:`bn_fold_fake_quant_weight_forward` on checked arguments (its backward checks them itself)."""
    ndim = weight.dim()
    factor = bn_fold_training_factor(gamma, var, eps) if divide_by_fold else bn_fold_factor(gamma, var, eps)
    factor = channel_view(factor, 0, ndim)
    out, mask = fake_quant_values(
        weight.float() * factor,
        channel_view(scale, 0, ndim),
        channel_view(zero_point, 0, ndim),
        quant_min,
        quant_max,
        compute_mask,
        torch.float32 if divide_by_fold else weight.dtype,
    )
    return ((out / factor).to(weight.dtype) if divide_by_fold else out), mask


def masked_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Straight-through gradient: ``grad`` where ``mask``, exactly 0 elsewhere."""
    check_mask(grad, mask)
    return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def bn_fold_fake_quant_weight_backward(
    grad: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    divide_by_fold: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`bn_fold_fake_quant_weight_forward`'s output w.r.t. ``weight``, ``gamma``, ``var``
    (docs/numerics.md, BN-folded weights).

    Takes the forward's arguments and recomputes its mask (and, for ``divide_by_fold=True``, its output) rather
    than reading them from memory: the kernels do the same element by element, so a training step neither
    stores a mask for the weight nor reads the output back.

    ``q(w f)``: ``grad_weight = grad * mask * f`` and ``grad_f = sum(grad * mask * w)`` per channel.
    ``out = q(w f) / f``: ``grad_weight = grad * mask`` and ``d out / d f = (mask * w - out) / f`` (0 where ``f``
    was taken as 1), so ``grad_f = sum(grad * (mask * w - out)) / f``; with a float16/bfloat16 weight ``out`` is
    the forward's rounded output, so the gamma/var gradients are only as exact as that rounding (a few percent
    of their size in fp16), while the weight's gradient is exact.
    In both cases ``grad_gamma = grad_f / std`` and ``grad_var = -grad_f * gamma / (2 std^3)``.
    """
    check_bn_fold_backward_args(grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max)
    out, mask = _bn_fold_values(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, True, divide_by_fold)
    ndim = weight.dim()
    std = torch.sqrt(var.float() + eps)
    factor = gamma.float() / std
    g = masked_grad(grad, mask).float()
    reduce_dims = list(range(1, ndim))

    def channel_sums(t: torch.Tensor) -> torch.Tensor:
        return t.sum(dim=reduce_dims) if reduce_dims else t

    if not divide_by_fold:
        grad_weight = (g * channel_view(factor, 0, ndim)).to(weight.dtype)
        grad_factor = channel_sums(g * weight.float())
    else:
        grad_weight = g.to(weight.dtype)
        masked_weight = torch.where(mask, weight.float(), torch.zeros((), device=weight.device))
        sums = channel_sums(grad.float() * (masked_weight - out.float()))
        grad_factor = torch.where(factor == 0, torch.zeros((), device=factor.device), sums / factor)
    grad_gamma = (grad_factor / std).to(gamma.dtype)
    grad_var = (-0.5 * grad_factor * gamma.float() / (std * std * std)).to(var.dtype)
    return grad_weight, grad_gamma, grad_var


# ---------------------------------------------------------------------------------------------
# Per-group weights: per-channel fake quantization of the [out * in / group_size, group_size] view.
# ---------------------------------------------------------------------------------------------


def per_group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` as ``[out * in / group_size, group_size]``: each row one group (a view of a contiguous weight)."""
    return x.reshape(-1, group_size)


def fake_quant_per_group_forward(x, scale, zero_point, group_size, quant_min, quant_max, compute_mask=True):
    check_per_group_args(x, scale, zero_point, group_size)
    out, mask = fake_quant_per_channel_forward(
        per_group_view(x, group_size), scale.reshape(-1), zero_point.reshape(-1), 0, quant_min, quant_max, compute_mask
    )
    return out.reshape(x.shape), mask.reshape(x.shape) if compute_mask else mask


# ---------------------------------------------------------------------------------------------
# Learned ranges (LSQ): fake quantization whose backward also gives the scale's (and zero point's) gradient.
# ---------------------------------------------------------------------------------------------

def learnable_zero_point(zero_point: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    """The integer zero point the learnable ops quantize with: a float one rounded (half to even) and clamped."""
    if zero_point.dtype == torch.float32:
        return torch.round(zero_point).clamp(quant_min, quant_max).to(torch.int32)
    return zero_point


def fake_quant_learnable_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    quant_min: int,
    quant_max: int,
    grad_factor: float,
) -> torch.Tensor:
    """The forward of the learnable op: :func:`fake_quant_per_tensor_forward` (``axis`` None) or
    :func:`fake_quant_per_channel_forward`, no mask (the backward recomputes everything from ``x``)."""
    axis = check_learnable_args(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
    zero_point = learnable_zero_point(zero_point, quant_min, quant_max)
    if axis is None:
        return fake_quant_per_tensor_forward(x, scale, zero_point, quant_min, quant_max, False)[0]
    return fake_quant_per_channel_forward(x, scale, zero_point, axis, quant_min, quant_max, False)[0]


def fake_quant_learnable_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    quant_min: int,
    quant_max: int,
    grad_factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_scale, grad_zero_point)`` of the learnable fake quantization (LSQ, Esser et al. 2020).

    With ``v = x / scale`` (as ``x * (1 / scale)``), ``q = round(v) + zero_point`` and ``g = grad``, element by
    element (each product rounded to fp32 in this order, as ``torch._fake_quantize_learnable_*`` compute it):

    * ``q`` in range: ``grad_x = g``; scale term ``((x_fq - x) * (1 / scale)) * g * grad_factor``, which is
      ``(round(v) - v) * g * grad_factor``; zero-point term 0;
    * ``q < quant_min`` (``> quant_max``): ``grad_x = 0``; scale term ``(g * (quant_min - zero_point)) *
      grad_factor`` (``quant_max``); zero-point term ``((-g) * scale) * grad_factor``;
    * ``x`` NaN: everything 0.

    The terms are summed (per tensor, or per channel along ``axis``) in float64 here; the kernels sum fp32
    partials in a fixed order, so their sums agree with this to a relative 1e-5 of the sum of the terms'
    magnitudes. ``grad_scale`` and ``grad_zero_point`` are float32 in the shapes of ``scale`` and ``zero_point``.
    """
    axis = check_learnable_backward_args(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
    ndim = x.dim()
    zp = learnable_zero_point(zero_point, quant_min, quant_max).to(torch.float32)
    if axis is None:
        s, z = scale.reshape(()), zp.reshape(())
    else:
        s, z = channel_view(scale, axis, ndim), channel_view(zp, axis, ndim)
    xf, g = x.float(), grad.float()
    inv_scale = 1.0 / s
    q = torch.round(xf * inv_scale) + z
    below, above = q < quant_min, q > quant_max
    inside = (q >= quant_min) & (q <= quant_max)
    x_fq = (q.clamp(quant_min, quant_max) - z) * s
    factor = torch.tensor(grad_factor, dtype=torch.float32, device=x.device)
    zero = torch.zeros((), device=x.device)
    scale_terms = torch.where(
        inside,
        ((x_fq - xf) * inv_scale) * g * factor,
        torch.where(below, (g * (quant_min - z)) * factor, torch.where(above, (g * (quant_max - z)) * factor, zero)),
    )
    zero_point_terms = torch.where(below | above, (-g * s) * factor, zero)
    grad_x = masked_grad(grad, inside)
    if axis is None:
        grad_scale, grad_zero_point = scale_terms.double().sum(), zero_point_terms.double().sum()
    else:
        dims = [d for d in range(ndim) if d != axis]
        grad_scale = scale_terms.double().sum(dim=dims) if dims else scale_terms.double()
        grad_zero_point = zero_point_terms.double().sum(dim=dims) if dims else zero_point_terms.double()
    return (
        grad_x,
        grad_scale.float().reshape(scale.shape),
        grad_zero_point.float().reshape(zero_point.shape),
    )


# ---------------------------------------------------------------------------------------------
# Range observation: the activation and weight ranges behind the scales (docs/numerics.md, Range observation).
# ---------------------------------------------------------------------------------------------


def batch_range(
    x: torch.Tensor, axis: int | None = None, fold: torch.Tensor | None = None, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 ``(min, max)`` of ``x``'s finite elements (per tensor, or per slice along ``axis``); NaN and
    ``±inf`` are left out, and a tensor or slice with no finite element gives ``(+inf, -inf)`` (min > max: no
    range, which :func:`observe_range` leaves the tracked range unchanged for).

    With ``fold`` (1-D, ``x.size(0)`` entries) it is the range of ``x * fold`` broadcast along axis 0,
    computed from the per-channel range of ``x``: rounding is monotonic, so ``min(x) * f`` is exactly
    ``min(x * f)`` for ``f >= 0``, and a negative ``f`` swaps min and max. ``relu=True`` gives the range of
    ``relu(x)`` (or ``relu(x * fold)``): ReLU is monotonic too, so that is ``(relu(min), relu(max))``.
    """
    low, high = _batch_range(x.detach(), axis, fold)
    if relu:
        found = low <= high
        low, high = torch.where(found, torch.relu(low), low), torch.where(found, torch.relu(high), high)
    return low, high


def _batch_range(
    x: torch.Tensor, axis: int | None, fold: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    finite = torch.isfinite(x)
    for_min, for_max = torch.where(finite, x, inf), torch.where(finite, x, -inf)
    if fold is None and axis is None:
        return for_min.amin().float(), for_max.amax().float()
    channel_axis = 0 if axis is None else axis
    # amin + amax: on CPU aminmax(dim=1) is not vectorized (docs/benchmarks.md, Numbers once quoted in code comments).
    low = for_min.movedim(channel_axis, 0).reshape(x.size(channel_axis), -1).amin(dim=1).float()
    high = for_max.movedim(channel_axis, 0).reshape(x.size(channel_axis), -1).amax(dim=1).float()
    if fold is not None:
        found = low <= high
        folded_low, folded_high = low * fold, high * fold
        negative = fold < 0
        folded_low, folded_high = (torch.where(negative, folded_high, folded_low),
                                   torch.where(negative, folded_low, folded_high))  # fmt: skip
        # Channels without a finite element keep (+inf, -inf), whatever their fold factor.
        low, high = torch.where(found, folded_low, low), torch.where(found, folded_high, high)
        if axis is None:
            low, high = low.amin(), high.amax()
    return low, high


def observe_range(
    x: torch.Tensor,
    tracked_range: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    averaging_constant: float,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    fold: torch.Tensor | None = None,
    relu: bool = False,
) -> None:
    """Observes ``x``'s range into ``tracked_range`` and sets ``scale``/``zero_point`` from it, in place.

    ``relu=True`` observes the range of ``relu(x)`` without forming it (a quantized ReLU output computed from
    the ReLU's input by ``fake_quant_per_tensor(..., relu=True)``).

    ``tracked_range`` is ``[min, max]`` (shape ``(2,)``, or ``(2, C)`` per channel along ``axis``). With
    ``averaging_constant == 1`` the batch range replaces it (a first observation, or weights, whose range is
    the current weight's); below 1 it moves towards the batch range: ``tracked + c * (batch - tracked)``
    (torch.ao's moving-average observer; ``c = 1 - decay``). Scale and zero point then follow from the
    tracked range by :func:`fakequant.qparams.choose_qparams`. The batch range is that of the finite elements
    (:func:`batch_range`): a tensor or channel with none leaves its tracked range as it was.
    """
    axis = check_observe_range_args(
        x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, fold
    )
    with torch.no_grad():
        batch = torch.stack(batch_range(x, axis, fold, relu))
        old = tracked_range.float()
        if averaging_constant == 1.0:
            tracked = batch
        else:
            tracked = old + (batch - old) * averaging_constant
        # A tensor or channel without a finite element keeps its tracked range (and so its scale).
        tracked = torch.where(batch[0] <= batch[1], tracked, old)
        tracked_range.copy_(tracked)
        new_scale, new_zero_point = choose_qparams(tracked[0], tracked[1], quant_min, quant_max, symmetric)
        scale.copy_(new_scale.reshape(scale.shape))
        zero_point.copy_(new_zero_point.reshape(zero_point.shape))


# ---------------------------------------------------------------------------------------------
# Float formats: FP8, MX and NVFP4 fake quantization (docs/numerics.md, "Float formats").
# ---------------------------------------------------------------------------------------------

_FP32_EXPONENT_BIAS = 127


def round_to_element(v: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """``v`` (fp32, already within ``[-fmt.max, fmt.max]`` or NaN) rounded to the nearest value of ``fmt``,
    ties to even: the grid spacing at ``v`` is ``2^(max(floor(log2|v|), emin) - mbits)`` (subnormals below
    ``2^emin``), ``v / spacing`` is exact, so ``round_half_even(v / spacing) * spacing`` is the rounded value
    (the sign of a zero kept)."""
    _, exponent = torch.frexp(v)  # v = m * 2^exponent, m in [0.5, 1): floor(log2|v|) = exponent - 1
    spacing = torch.ldexp(torch.ones_like(v), torch.clamp(exponent - 1, min=fmt.emin) - fmt.mbits)
    return torch.round(v / spacing) * spacing


def _divide(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor``, an IEEE division on every device (CUDA multiplies by the reciprocal of a Python number)."""
    return t / torch.full_like(t, divisor)


def _blocks(xf: torch.Tensor, block_size: int) -> torch.Tensor:
    return xf.reshape(-1, block_size if block_size > 0 else max(xf.numel(), 1))


def fp8_scale_from_amax(amax: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """``amax / fmt.max`` clamped to ``[2^-126, 2^(126 - emax)]``: an all-zero block gets the smallest normal
    scale (its output is 0, not NaN) and an infinite one a scale whose ``fmt.max`` multiple is finite; NaN
    stays NaN."""
    return torch.clamp(_divide(amax, fmt.max), min=2.0**-126, max=2.0 ** (126 - fmt.emax))


def fake_quant_fp8_forward(
    x: torch.Tensor,
    scale: torch.Tensor | None,
    fmt: str,
    block_size: int = 0,
    compute_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``clamp(x / s, -max, max)`` rounded to FP8 ``fmt`` (ties to even), times ``s``: in fp32, rounded once to
    ``x.dtype``. ``s``: ``scale`` per block of ``block_size`` consecutive elements (0: the whole tensor), or,
    when ``scale`` is None, :func:`fp8_scale_from_amax` of each block's absolute maximum. Mask: ``|x / s| <= max``
    (where the straight-through gradient passes)."""
    check_fp8_args(x, scale, fmt, block_size)
    element = ELEMENT_FORMATS[fmt]
    xf = _blocks(x.float(), block_size)
    if scale is None:
        s = fp8_scale_from_amax(xf.abs().amax(-1, keepdim=True), element) if x.numel() else xf[:, :1]
    else:
        s = scale.float().reshape(-1, 1)
    v = xf / s
    out = round_to_element(torch.clamp(v, -element.max, element.max), element) * s
    mask = (v.abs() <= element.max).reshape(x.shape) if compute_mask else _empty_mask(x)
    return out.reshape(x.shape).to(x.dtype), mask


def mx_scales(amax: torch.Tensor, element: ElementFormat, scale_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The E8M0 code of each block's shared scale from its fp32 ``amax``, and the fp32 factor the elements are
    brought into the element range with (torchao's ``to_mx``).

    ``"floor"``: code ``clamp(e(amax) - emax, -127, 128) + 127`` where ``e`` is amax's unbiased fp32 exponent
    field (-127 for 0 and subnormals, 128 for inf/NaN); 255 (NaN) for a NaN amax. The elements are divided by
    the code's fp32 value ``2^(code - 127)``, floored at 2^-126 (code 255 reads as inf). ``"rceil"``: code
    ``clamp(ceil(log2(amax / max)), -127, 127) + 127`` with the exact ceiling (the next power of two at or above;
    0 for a zero amax), 254 for an infinite amax and 255 for NaN; the elements are multiplied by ``2^(127 -
    code)`` (1.0 for code 0, 2^-127 for 254, NaN for 255)."""
    bits = amax.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - _FP32_EXPONENT_BIAS
    if scale_mode == "floor":
        code = torch.clamp(exponent - element.emax, -127, 128) + 127
        code = torch.where(torch.isnan(amax), 255, code)
        factor = 1.0 / torch.clamp((code << 23).view(torch.float32), min=2.0**-126)
        return code, factor
    descale = _divide(amax, element.max)
    dbits = descale.view(torch.int32)
    dexp = ((dbits >> 23) & 0xFF) - _FP32_EXPONENT_BIAS
    # ceil(log2(d)), exactly: the exponent, plus one unless d is a power of two; a subnormal d (< 2^-126) gives
    # -126 above 2^-127 and at most -127 (clamped to it) otherwise.
    mantissa = dbits & 0x7FFFFF
    ceil_log2 = torch.where(
        dexp > -127, dexp + (mantissa != 0).to(torch.int32), torch.where(mantissa > 0x400000, -126, -127)
    )
    code = torch.clamp(ceil_log2, -127, 127) + 127
    code = torch.where(descale == 0, 0, code)
    code = torch.where(torch.isinf(descale), 254, code)
    code = torch.where(torch.isnan(descale), 255, code)
    factor = torch.ldexp(torch.ones_like(amax), (127 - code).to(torch.int32))
    factor = torch.where(code == 0, 1.0, factor)
    factor = torch.where(code == 254, 2.0**-127, factor)
    factor = torch.where(code == 255, float("nan"), factor)
    return code, factor


def fake_quant_mx_forward(
    x: torch.Tensor,
    elem: str,
    block_size: int = 32,
    scale_mode: str = "floor",
    compute_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX fake quantization along the last dimension (torchao's ``to_mx`` then ``to_dtype``): per block of
    ``block_size``, the shared E8M0 scale of :func:`mx_scales`; each element ``v = x * factor`` clamped to
    ``[-max, max]`` and rounded to ``elem`` (ties to even); out ``= element * 2^(code - 127)`` (NaN for code 255),
    in fp32, rounded once to ``x.dtype``. Mask: ``|v| <= max``."""
    check_mx_args(x, elem, block_size, scale_mode)
    element = ELEMENT_FORMATS[elem]
    xf = x.float().reshape(-1, block_size)
    code, factor = mx_scales(xf.abs().amax(-1, keepdim=True), element, scale_mode)
    v = xf * factor
    q = round_to_element(torch.clamp(v, -element.max, element.max), element)
    dequant = torch.where(code == 255, float("nan"), torch.ldexp(torch.ones_like(factor), code - 127))
    out = (q * dequant).reshape(x.shape).to(x.dtype)
    mask = (v.abs() <= element.max).reshape(x.shape) if compute_mask else _empty_mask(x)
    return out, mask


NVFP4_BLOCK_SIZE = 16
_E2M1 = ELEMENT_FORMATS["e2m1"]
_E4M3 = ELEMENT_FORMATS["e4m3"]


def nvfp4_per_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale NVFP4 computes when none is given: ``amax(|x|) / (6 * 448)`` (torchao's
    ``per_tensor_amax_to_scale``), floored at 2^-120 so that an all-zero tensor gives zeros and ``(1 / P) / s``
    stays finite for the smallest block scale ``s = 2^-6``."""
    if x.numel() == 0:
        amax = torch.zeros((), device=x.device)
    else:  # max(-min, max) is amax(|x|) (NaN included) in one read of x, where abs() would write a copy first
        low, high = torch.aminmax(x)
        amax = torch.maximum(-low, high).float()
    return torch.clamp(_divide(amax, _E2M1.max * _E4M3.max), min=NVFP4_SMALLEST_PER_TENSOR_SCALE).reshape(1)


def fake_quant_nvfp4_forward(
    x: torch.Tensor,
    per_tensor_scale: torch.Tensor | None,
    block_size: int = NVFP4_BLOCK_SIZE,
    compute_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 fake quantization along the last dimension (torchao's ``nvfp4_quantize`` then ``dequantize``).

    Per block of ``block_size``: ``b = amax / 6``; with ``per_tensor_scale`` P, ``s = e4m3(clamp(b / P, 2^-6,
    448))`` and the elements ``v = x * ((1 / P) / s)``, out ``= e2m1(clamp(v, -6, 6)) * (P * s)``; without it,
    ``s = e4m3(clamp(b, 2^-6, 448))``, ``v = x * (1 / s)``, out ``= e2m1(...) * s``. fp32 throughout, rounded
    once to ``x.dtype``. Mask: ``|v| <= 6``."""
    check_nvfp4_args(x, per_tensor_scale, block_size)
    xf = x.float().reshape(-1, block_size)
    block_scale = _divide(xf.abs().amax(-1, keepdim=True), _E2M1.max)
    if per_tensor_scale is None:
        s = round_to_element(torch.clamp(block_scale, 2.0**-6, _E4M3.max), _E4M3)
        factor, dequant = 1.0 / s, s
    else:
        p = per_tensor_scale.float().reshape(())
        s = round_to_element(torch.clamp(block_scale / p, 2.0**-6, _E4M3.max), _E4M3)
        factor, dequant = (1.0 / p) / s, p * s
    v = xf * factor
    out = (round_to_element(torch.clamp(v, -_E2M1.max, _E2M1.max), _E2M1) * dequant).reshape(x.shape).to(x.dtype)
    mask = (v.abs() <= _E2M1.max).reshape(x.shape) if compute_mask else _empty_mask(x)
    return out, mask
