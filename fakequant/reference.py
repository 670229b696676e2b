"""Pure-PyTorch reference implementations: the oracle every kernel is tested against.

Two layers live here:

* ``*_forward`` functions compute ``(out, mask)`` with plain tensor ops and no autograd. They are
  registered as the ``"default"`` kernel of each ``fakequant::`` op (the fallback on any device) and
  they are "the pure-PyTorch composition" that the benchmarks compare against.
* The differentiable functions (``fake_quant_per_tensor`` etc.) wrap those values in a
  straight-through estimator built from ordinary autograd, so tests compare each op's registered
  backward against gradients that autograd derives on its own.

Numerics (SPEC §1): multiply by the fp32 reciprocal of the scale, round half to even, take the mask on
the rounded, unclamped ``q``; NaN stays NaN (mask 0), ``+inf``/``-inf`` go to the top/bottom of the
range (mask 0); fp16/bf16 are computed in fp32 and returned in the input dtype.
"""

from __future__ import annotations

import math

import torch

from fakequant.qparams import choose_qparams

__all__ = [
    "FLOAT_DTYPES",
    "QUANT_LIMIT",
    "check_fake_quant_args",
    "check_binarize_args",
    "check_bn_fold_args",
    "normalize_axis",
    "fake_quant_per_tensor_forward",
    "fake_quant_per_channel_forward",
    "binarize_forward",
    "bn_fold_factor",
    "bn_fold_training_factor",
    "bn_fold_fake_quant_weight_forward",
    "masked_grad",
    "check_bn_fold_backward_args",
    "bn_fold_fake_quant_weight_backward",
    "check_observe_range_args",
    "batch_range",
    "observe_range",
    "fake_quant_per_tensor",
    "fake_quant_per_channel",
    "binarize",
    "bn_fold_fake_quant_weight",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)
# Every integer level must be exact in fp32, whose 24-bit significand holds integers up to 2^24.
QUANT_LIMIT = 1 << 24


# ---------------------------------------------------------------------------------------------
# Argument checks. The C++ kernels make the same checks with TORCH_CHECK_VALUE, so every backend
# raises ValueError with the same wording.
# ---------------------------------------------------------------------------------------------


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"fakequant: {name} has dtype {x.dtype}; allowed: float32, float16, bfloat16")


def _check_range(quant_min: int, quant_max: int) -> None:
    if quant_min > quant_max:
        raise ValueError(
            f"fakequant: quant_min ({quant_min}) must be <= quant_max ({quant_max})"
        )
    if quant_min < -QUANT_LIMIT or quant_max > QUANT_LIMIT:
        raise ValueError(
            f"fakequant: quant range [{quant_min}, {quant_max}] must lie within "
            f"[-2^24, 2^24] so that every level is exact in fp32"
        )


def normalize_axis(axis: int, ndim: int) -> int:
    """Returns ``axis`` in ``[0, ndim)`` or raises ``ValueError``."""
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"fakequant: axis {axis} is out of range for a tensor with {ndim} dimensions "
            f"(allowed: {-ndim} to {ndim - 1})"
        )
    return axis % ndim


def _check_zero_point_dtype(zero_point: torch.Tensor, learned: bool = False) -> None:
    """int32/int64; ``learned``: also float32 (a learned zero point, rounded and clamped by the learnable ops)."""
    if zero_point.dtype in INT_DTYPES or (learned and zero_point.dtype == torch.float32):
        return
    allowed = "int32, int64, float32" if learned else "int32, int64"
    raise ValueError(f"fakequant: zero_point has dtype {zero_point.dtype}; allowed: {allowed}")


def _check_qparam_shapes(scale: torch.Tensor, zero_point: torch.Tensor, channels: int | None) -> None:
    """One element each per tensor (``channels`` None), else 1-D with ``channels`` elements."""
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if channels is None and t.numel() != 1:
            raise ValueError(
                f"fakequant: per-tensor {name} must have exactly one element, got shape {tuple(t.shape)}"
            )
        if channels is not None and (t.dim() != 1 or t.numel() != channels):
            raise ValueError(
                f"fakequant: per-channel {name} must be 1-D with {channels} elements "
                f"(the size of the quantized axis), got shape {tuple(t.shape)}"
            )


def _check_qparams(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    channels: int | None,
    check_values: bool,
    learned_zero_point: bool = False,
) -> None:
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t.device != x.device:
            raise ValueError(
                f"fakequant: {name} is on {t.device} but x is on {x.device}; they must be on the same device"
            )
    if scale.dtype != torch.float32:
        raise ValueError(f"fakequant: scale has dtype {scale.dtype}; allowed: float32")
    _check_zero_point_dtype(zero_point, learned_zero_point)
    _check_qparam_shapes(scale, zero_point, channels)
    if check_values:
        _check_qparam_values(scale, zero_point, quant_min, quant_max)


def _check_qparam_values(scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int) -> None:
    # Value checks are free on CPU tensors; on a GPU they would cost a device-to-host sync on every
    # call, so there the quantizers (which compute the values) guarantee them instead. Fake tensors
    # (tracing, compile) have no values to check. A float (learned) zero point is clamped into the range by the
    # learnable ops, not checked against it.
    if scale.device.type == "cpu" and scale.numel() > 0:
        bad = ~(torch.isfinite(scale) & (scale > 0))
        if bool(bad.any()):
            value = scale[bad].flatten()[0].item()
            raise ValueError(f"fakequant: scale must be finite and > 0, got {value}")
    if zero_point.device.type == "cpu" and zero_point.numel() > 0 and not zero_point.is_floating_point():
        bad = (zero_point < quant_min) | (zero_point > quant_max)
        if bool(bad.any()):
            value = zero_point[bad].flatten()[0].item()
            raise ValueError(
                f"fakequant: zero_point {value} is outside [quant_min, quant_max] = [{quant_min}, {quant_max}]"
            )


def check_fake_quant_args(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
    check_values: bool = True,
    learned_zero_point: bool = False,
) -> int | None:
    """Validates fake-quant arguments; returns the normalized axis (None for per-tensor). ``learned_zero_point``
    also accepts a float32 zero point (the learnable ops')."""
    _check_x(x)
    _check_range(quant_min, quant_max)
    channels = None
    if axis is not None:
        axis = normalize_axis(axis, x.dim())
        channels = x.size(axis)
    _check_qparams(x, scale, zero_point, quant_min, quant_max, channels, check_values, learned_zero_point)
    return axis


def check_binarize_args(x: torch.Tensor) -> None:
    _check_x(x)


def check_bn_fold_args(
    weight: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    check_values: bool = True,
) -> None:
    _check_x(weight, "weight")
    if weight.dim() < 1:
        raise ValueError("fakequant: weight must have at least one dimension (output channels first)")
    channels = weight.size(0)
    for name, t in (("gamma", gamma), ("var", var)):
        if t.device != weight.device:
            raise ValueError(
                f"fakequant: {name} is on {t.device} but weight is on {weight.device}; "
                "they must be on the same device"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"fakequant: {name} has dtype {t.dtype}; allowed: float32, float16, bfloat16")
        if t.dim() != 1 or t.numel() != channels:
            raise ValueError(
                f"fakequant: {name} must be 1-D with {channels} elements (weight.size(0)), "
                f"got shape {tuple(t.shape)}"
            )
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"fakequant: eps must be finite and >= 0, got {eps}")
    _check_range(quant_min, quant_max)
    _check_qparams(weight, scale, zero_point, quant_min, quant_max, channels, check_values)


# ---------------------------------------------------------------------------------------------
# Forward values: the pure-PyTorch composition.
# ---------------------------------------------------------------------------------------------


def _empty_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.bool, device=x.device)


def _channel_view(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _fake_quant_values(
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
    out, mask = _fake_quant_values(
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
    return _fake_quant_values(
        x.float(),
        _channel_view(scale, axis, x.dim()),
        _channel_view(zero_point, axis, x.dim()),
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
    factor = _channel_view(factor, 0, ndim)
    out, mask = _fake_quant_values(
        weight.float() * factor,
        _channel_view(scale, 0, ndim),
        _channel_view(zero_point, 0, ndim),
        quant_min,
        quant_max,
        compute_mask,
        torch.float32 if divide_by_fold else weight.dtype,
    )
    return ((out / factor).to(weight.dtype) if divide_by_fold else out), mask


def masked_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Straight-through gradient: ``grad`` where ``mask``, exactly 0 elsewhere."""
    if mask.shape != grad.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"fakequant: mask must be a bool tensor of the gradient's shape {tuple(grad.shape)}, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def check_bn_fold_backward_args(
    grad: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    check_values: bool = True,
) -> None:
    """:func:`check_bn_fold_args` (the backward recomputes the forward) and ``grad`` against ``weight``; the values
    of the qparams last, as the kernels check them."""
    check_bn_fold_args(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, check_values=False)
    _check_x(grad, "grad")
    if grad.device != weight.device:
        raise ValueError(
            f"fakequant: grad is on {grad.device} but weight is on {weight.device}; they must be on the same device"
        )
    if grad.shape != weight.shape:
        raise ValueError(
            f"fakequant: grad must have the weight's shape {tuple(weight.shape)}, got shape {tuple(grad.shape)}"
        )
    if check_values:
        _check_qparam_values(scale, zero_point, quant_min, quant_max)


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
    """Gradients of :func:`bn_fold_fake_quant_weight_forward`'s output w.r.t. ``weight``, ``gamma``, ``var`` (SPEC §1).

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
        grad_weight = (g * _channel_view(factor, 0, ndim)).to(weight.dtype)
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


def check_per_group_args(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int) -> int:
    """Checks the per-group layout; returns the number of groups per output channel."""
    _check_x(x)
    if x.dim() < 2 or math.prod(x.shape[2:]) != 1:
        raise ValueError(
            f"fakequant: per-group fake quantization takes a Linear [out, in] or 1x1 Conv [out, in, 1, 1] weight, "
            f"got shape {tuple(x.shape)}"
        )
    if not isinstance(group_size, int) or group_size < 1 or x.size(1) % group_size != 0:
        raise ValueError(
            f"fakequant: group_size {group_size} does not divide the {x.size(1)} input channels of the weight; "
            "allowed: a divisor of the input channels (e.g. 32, 64, 128)"
        )
    groups = x.size(1) // group_size
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if tuple(t.shape) != (x.size(0), groups):
            raise ValueError(
                f"fakequant: per-group {name} must have shape {(x.size(0), groups)} (out, in / group_size), got "
                f"{tuple(t.shape)}"
            )
    return groups


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

def check_learnable_args(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    quant_min: int,
    quant_max: int,
    grad_factor: float,
    check_values: bool = True,
) -> int | None:
    """Validates the learnable ops' arguments; returns the normalized axis (None per tensor).

    ``zero_point`` may be float32 (a learned zero point): it is rounded half to even and clamped to
    ``[quant_min, quant_max]``, as ``torch._fake_quantize_learnable_*`` do; an integer one must lie in the range.
    """
    axis = check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis, check_values=False,
                                 learned_zero_point=True)
    if not math.isfinite(grad_factor):
        raise ValueError(f"fakequant: grad_factor must be finite, got {grad_factor}")
    if check_values:
        _check_qparam_values(scale, zero_point, quant_min, quant_max)
    return axis


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


def check_learnable_backward_args(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor,
                                  check_values: bool = True) -> int | None:  # fmt: skip
    axis = check_learnable_args(x, scale, zero_point, axis, quant_min, quant_max, grad_factor, check_values)
    if grad.shape != x.shape or grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(
            f"fakequant: grad must match x (shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}); got shape "
            f"{tuple(grad.shape)}, dtype {grad.dtype}, device {grad.device}"
        )
    return axis


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
        s, z = _channel_view(scale, axis, ndim), _channel_view(zp, axis, ndim)
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
# Range observation: the activation and weight ranges behind the scales (SPEC §2).
# ---------------------------------------------------------------------------------------------


def check_observe_range_args(
    x: torch.Tensor,
    tracked_range: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    averaging_constant: float,
    quant_min: int,
    quant_max: int,
    fold: torch.Tensor | None = None,
) -> int | None:
    """Checks the arguments of :func:`observe_range`; returns the normalized axis (None: per tensor)."""
    _check_x(x)
    if x.numel() == 0:
        raise ValueError(f"fakequant: cannot observe the range of an empty tensor (x has shape {tuple(x.shape)})")
    _check_range(quant_min, quant_max)
    if quant_min == quant_max:
        raise ValueError(f"fakequant: choosing a scale needs quant_min < quant_max, got {quant_min} == {quant_max}")
    if not (math.isfinite(averaging_constant) and 0.0 < averaging_constant <= 1.0):
        raise ValueError(
            f"fakequant: averaging_constant must be in (0, 1] (1 replaces the tracked range), got {averaging_constant}"
        )
    if axis is not None:
        axis = normalize_axis(axis, x.dim())
    channels = 1 if axis is None else x.size(axis)
    state = [("tracked_range", tracked_range), ("scale", scale), ("zero_point", zero_point)]
    if fold is not None:
        state.append(("fold", fold))
    for name, t in state:
        if t.device != x.device:
            raise ValueError(
                f"fakequant: {name} is on {t.device} but x is on {x.device}; they must be on the same device"
            )
    _check_x(tracked_range, "tracked_range")
    _check_x(scale, "scale")
    _check_zero_point_dtype(zero_point)
    range_shape = (2,) if axis is None else (2, channels)
    if tuple(tracked_range.shape) != range_shape:
        raise ValueError(
            f"fakequant: tracked_range must have shape {range_shape} ([min, max]"
            f"{'' if axis is None else ' per channel'}), got {tuple(tracked_range.shape)}"
        )
    _check_qparam_shapes(scale, zero_point, None if axis is None else channels)
    if fold is not None:
        if axis not in (None, 0):
            raise ValueError(f"fakequant: a fold factor applies along axis 0; allowed axis: None or 0, got {axis}")
        if fold.dtype != torch.float32 or fold.dim() != 1 or fold.numel() != x.size(0):
            raise ValueError(
                f"fakequant: fold must be a 1-D float32 tensor with {x.size(0)} elements (x.size(0)), got "
                f"{fold.dtype} of shape {tuple(fold.shape)}"
            )
    return axis


def batch_range(
    x: torch.Tensor, axis: int | None = None, fold: torch.Tensor | None = None, relu: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 ``(min, max)`` of ``x`` (per tensor, or per slice along ``axis``); NaN propagates.

    With ``fold`` (1-D, ``x.size(0)`` entries) it is the range of ``x * fold`` broadcast along axis 0,
    computed from the per-channel range of ``x``: rounding is monotonic, so ``min(x) * f`` is exactly
    ``min(x * f)`` for ``f >= 0``, and a negative ``f`` swaps min and max. ``relu=True`` gives the range of
    ``relu(x)`` (or ``relu(x * fold)``): ReLU is monotonic too, so that is ``(relu(min), relu(max))``.
    """
    low, high = _batch_range(x.detach(), axis, fold)
    return (torch.relu(low), torch.relu(high)) if relu else (low, high)


def _batch_range(
    x: torch.Tensor, axis: int | None, fold: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if fold is None and axis is None:
        return x.amin().float(), x.amax().float()
    channel_axis = 0 if axis is None else axis
    # amin + amax: on CPU aminmax(dim=1) is not vectorized (measured 65 us against 10 us on a 64x576 weight).
    flat = x.movedim(channel_axis, 0).reshape(x.size(channel_axis), -1)
    low, high = flat.amin(dim=1).float(), flat.amax(dim=1).float()
    if fold is not None:
        low, high = low * fold, high * fold
        negative = fold < 0
        low, high = torch.where(negative, high, low), torch.where(negative, low, high)
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
    tracked range by :func:`fakequant.qparams.choose_qparams`.
    """
    axis = check_observe_range_args(
        x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, fold
    )
    with torch.no_grad():
        batch = torch.stack(batch_range(x, axis, fold, relu))
        if averaging_constant == 1.0:
            tracked = batch
        else:
            tracked = tracked_range.float()
            tracked = tracked + (batch - tracked) * averaging_constant
        tracked_range.copy_(tracked)
        new_scale, new_zero_point = choose_qparams(tracked[0], tracked[1], quant_min, quant_max, symmetric)
        scale.copy_(new_scale.reshape(scale.shape))
        zero_point.copy_(new_zero_point.reshape(zero_point.shape))



# ---------------------------------------------------------------------------------------------
# Differentiable references: the forward values above with a straight-through estimator that
# autograd differentiates on its own (the oracle for every registered backward).
# ---------------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Returns ``value`` in the forward pass and hands its gradient to ``source`` unchanged."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        ctx.source_dtype = source.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad.to(ctx.source_dtype)


def _masked_source(source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where routes the gradient to `source` only where mask holds, and its value is `source`.
    return torch.where(mask, source, source.detach())


def fake_quant_per_tensor(x, scale, zero_point, quant_min, quant_max, relu=False):
    if relu:  # ReLU's own autograd, then the straight-through estimator of the quantization
        x = torch.relu(x)
    out, mask = fake_quant_per_tensor_forward(x.detach(), scale, zero_point, quant_min, quant_max)
    return _StraightThrough.apply(out, _masked_source(x, mask))


def fake_quant_per_channel(x, scale, zero_point, axis, quant_min, quant_max):
    out, mask = fake_quant_per_channel_forward(x.detach(), scale, zero_point, axis, quant_min, quant_max)
    return _StraightThrough.apply(out, _masked_source(x, mask))


def binarize(x, clipped_ste=True):
    out, mask = binarize_forward(x.detach(), clipped_ste)
    source = _masked_source(x, mask) if clipped_ste else x
    return _StraightThrough.apply(out, source)


def bn_fold_fake_quant_weight(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, divide_by_fold=False):
    out, mask = bn_fold_fake_quant_weight_forward(
        weight.detach(), gamma.detach(), var.detach(), eps, scale, zero_point, quant_min, quant_max,
        divide_by_fold=divide_by_fold,
    )
    ndim = weight.dim()
    if not divide_by_fold:
        folded = weight.float() * _channel_view(bn_fold_factor(gamma, var, eps), 0, ndim)
        return _StraightThrough.apply(out, _masked_source(folded, mask))
    # q(w f) / f with q's straight-through estimator: autograd differentiates both appearances of f.
    factor = _channel_view(bn_fold_training_factor(gamma, var, eps), 0, ndim)
    folded = weight.float() * factor
    quantized, _ = _fake_quant_values(
        folded.detach(), _channel_view(scale, 0, ndim), _channel_view(zero_point, 0, ndim), quant_min, quant_max,
        False, torch.float32,
    )
    return (_StraightThrough.apply(quantized, _masked_source(folded, mask)) / factor).to(weight.dtype)


class _LearnableFakeQuant(torch.autograd.Function):
    """The reference's autograd of the learnable op: :func:`fake_quant_learnable_backward`."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.arguments = (axis, quant_min, quant_max, grad_factor)
        return fake_quant_learnable_forward(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        grad_x, grad_scale, grad_zero_point = fake_quant_learnable_backward(grad, x, scale, zero_point, *ctx.arguments)
        return grad_x, grad_scale, grad_zero_point if zero_point.is_floating_point() else None, None, None, None, None


def fake_quant_learnable(x, scale, zero_point, quant_min, quant_max, grad_factor, axis=None):
    return _LearnableFakeQuant.apply(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
