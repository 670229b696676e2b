"""Schemas of the ``fakequant::`` custom ops, their default (reference) kernels, fake impls and autograd.

The schemas are defined here, in Python, before the compiled extension is loaded. ``fakequant._C`` adds
``TORCH_LIBRARY_IMPL`` kernels for the CPU (and CUDA) dispatch keys, which take precedence over the
``"default"`` (CompositeExplicitAutograd) reference kernels registered below, and for the Autograd key: the
autograd formulas below, written in C++ (``csrc/autograd.cpp``). The Python formulas are registered by
:func:`register_python_autograd` once loading ``_C`` has been tried, only for the ops that ``_C`` left without
an autograd kernel (all of them when ``_C`` is disabled or missing), so that no kernel overrides another.

Ops (every ``compute_mask=False`` call returns an empty bool ``mask`` and, except for ``bn_fold_fake_quant_weight``,
whose backward recomputes the mask, cannot be differentiated):

``fake_quant_per_tensor(x, scale, zero_point, quant_min, quant_max, compute_mask=True, relu=False) -> (out, mask)``
    ``scale``: one fp32 element, ``zero_point``: one int32/int64 element. ``relu=True`` fake-quantizes
    ``relu(x)`` and puts ReLU's gradient (``x > 0``) into the mask: a quantized ReLU output computed from the
    ReLU's input, whose backward is one masked_grad instead of that plus ReLU's threshold_backward.
``fake_quant_per_channel(x, scale, zero_point, axis, quant_min, quant_max, compute_mask=True) -> (out, mask)``
    ``scale``/``zero_point``: 1-D with ``x.size(axis)`` elements.
``binarize(x, clipped_ste=True, compute_mask=True) -> (out, mask)``
    The mask (``|x| <= 1``) exists only for the clipped STE; the identity STE passes gradients through.
``bn_fold_fake_quant_weight(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max,
compute_mask=True, divide_by_fold=False) -> (out, mask)``
    ``weight`` has output channels on axis 0; ``gamma``, ``var``, ``scale`` and ``zero_point`` are 1-D
    with ``weight.size(0)`` elements. ``out = fake_quant_per_channel(weight * gamma / sqrt(var + eps))``
    along axis 0. Gradients flow to ``weight``, ``gamma`` and ``var``; ``var`` may be the running
    variance (a buffer, no gradient) or a batch variance. ``divide_by_fold=True`` returns ``q(w f) / f`` instead
    (``f`` taken as 1 where it is 0): the weight of a BN-folded conv in training, whose output BN then
    normalizes with batch statistics (one op instead of a division and its backward over the weight).
``masked_grad(grad, mask) -> Tensor``
    The straight-through backward: ``grad`` where ``mask``, 0 elsewhere.
``bn_fold_fake_quant_weight_backward(grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max,
divide_by_fold=False) -> (grad_weight, grad_gamma, grad_var)``
    Takes the forward's arguments and recomputes its mask (and divided output) element by element instead of
    reading them: the forward+backward then moves 20 bytes per fp32 weight element instead of 26 (divided) or 22,
    and ``bn_fold_fake_quant_weight`` is differentiable with ``compute_mask=False``. With ``divide_by_fold`` the
    gamma/var gradients sum ``grad * (mask * w - out)``, the quantization error; with a float16/bfloat16 weight
    ``out`` is the rounded half output, so those two gradients are only as exact as that rounding (a few percent
    of their size in fp16), while the weight's gradient is exact.
``fake_quant_per_group(x, scale, zero_point, group_size, quant_min, quant_max, compute_mask=True) -> (out, mask)``
    A Linear ``[out, in]`` or 1x1 Conv ``[out, in, 1, 1]`` weight fake-quantized per group of ``group_size``
    consecutive input channels, ``scale``/``zero_point`` shaped ``[out, in / group_size]``: a composite
    (CompositeImplicitAutograd) of ``fake_quant_per_channel`` on the ``[out * in / group_size, group_size]`` view.
``fake_quant_learnable(x, scale, zero_point, axis, quant_min, quant_max, grad_factor) -> out``
    Fake quantization per tensor (``axis`` None) or per channel whose gradient also reaches ``scale`` and, when
    it is float32 (a learned zero point, rounded and clamped in the forward), ``zero_point``: LSQ's. A
    composite op (``COMPOSITE_OPS``): its forward is the per-tensor/per-channel op of the chosen backend, and its
    backward, ``fake_quant_learnable_backward``, recomputes the mask from ``x`` instead of storing one.
``fake_quant_learnable_backward(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
-> (grad_x, grad_scale, grad_zero_point)``
    One pass over ``grad`` and ``x``: ``grad_x`` and the per-tensor/per-channel sums of LSQ's terms
    (``reference.fake_quant_learnable_backward``), summed in a fixed order (the same bits run to run).
``observe_range(x, tracked_range!, scale!, zero_point!, axis, averaging_constant, quant_min, quant_max, symmetric,
fold=None, relu=False) -> ()``
    Updates the tracked ``[min, max]`` with ``x``'s range (replaced when ``averaging_constant == 1``, else
    moved towards it) and sets ``scale``/``zero_point`` from it, all in place (``reference.observe_range``).
    ``fold`` observes ``x * fold`` along axis 0 (a BN-folded weight), ``relu`` observes ``relu(x)``.
    One call instead of the ~15 small tensor ops a quantizer spends per layer and step on its ranges.
"""

from __future__ import annotations

import torch

from fakequant import reference

LIBRARY = "fakequant"

_lib = torch.library.Library(LIBRARY, "DEF")

SCHEMAS = {
    "fake_quant_per_tensor": (
        "(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
        "bool compute_mask=True, bool relu=False) -> (Tensor out, Tensor mask)"
    ),
    "fake_quant_per_channel": (
        "(Tensor x, Tensor scale, Tensor zero_point, int axis, int quant_min, int quant_max, "
        "bool compute_mask=True) -> (Tensor out, Tensor mask)"
    ),
    "binarize": "(Tensor x, bool clipped_ste=True, bool compute_mask=True) -> (Tensor out, Tensor mask)",
    "bn_fold_fake_quant_weight": (
        "(Tensor weight, Tensor gamma, Tensor var, float eps, Tensor scale, Tensor zero_point, "
        "int quant_min, int quant_max, bool compute_mask=True, bool divide_by_fold=False) -> (Tensor out, Tensor mask)"
    ),
    "masked_grad": "(Tensor grad, Tensor mask) -> Tensor",
    "bn_fold_fake_quant_weight_backward": (
        "(Tensor grad, Tensor weight, Tensor gamma, Tensor var, float eps, Tensor scale, Tensor zero_point, "
        "int quant_min, int quant_max, bool divide_by_fold=False) -> (Tensor grad_weight, Tensor grad_gamma, "
        "Tensor grad_var)"
    ),
    "observe_range": (
        "(Tensor x, Tensor(a!) tracked_range, Tensor(b!) scale, Tensor(c!) zero_point, int? axis, "
        "float averaging_constant, int quant_min, int quant_max, bool symmetric, Tensor? fold=None, "
        "bool relu=False) -> ()"
    ),
    "fake_quant_per_group": (
        "(Tensor x, Tensor scale, Tensor zero_point, int group_size, int quant_min, int quant_max, "
        "bool compute_mask=True) -> (Tensor out, Tensor mask)"
    ),
    "fake_quant_learnable": (
        "(Tensor x, Tensor scale, Tensor zero_point, int? axis, int quant_min, int quant_max, float grad_factor) "
        "-> Tensor"
    ),
    "fake_quant_learnable_backward": (
        "(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int? axis, int quant_min, int quant_max, "
        "float grad_factor) -> (Tensor grad_x, Tensor grad_scale, Tensor grad_zero_point)"
    ),
}

for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)

OP_NAMES = tuple(SCHEMAS)
# Ops whose default kernel calls other fakequant:: ops (so runs on whatever kernels serve those) and that no
# backend overrides: fake_quant_learnable is fake_quant_per_tensor/_per_channel with the LSQ autograd.
# fake_quant_per_group is fake_quant_per_channel of the [out * in / group_size, group_size] view (a
# CompositeImplicitAutograd kernel: autograd and compile see the per-channel op).
COMPOSITE_OPS = ("fake_quant_learnable", "fake_quant_per_group")
# The ops with a kernel of their own on every backend (C++, CUDA, Triton, reference).
KERNEL_OPS = tuple(name for name in OP_NAMES if name not in COMPOSITE_OPS)


# ---------------------------------------------------------------------------------------------
# Default kernels: the reference, laid out like the fake impls (empty_like keeps x's strides).
# ---------------------------------------------------------------------------------------------


def _like(values: torch.Tensor, template: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    if values.shape != template.shape:
        return values  # the empty mask of compute_mask=False (also when x itself is empty)
    out = torch.empty_like(template, dtype=dtype or values.dtype)
    return out.copy_(values)


def _with_layout(x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _like(out, x), _like(mask, x, torch.bool)


def fake_quant_per_tensor_default(x, scale, zero_point, quant_min, quant_max, compute_mask=True, relu=False):
    return _with_layout(
        x, *reference.fake_quant_per_tensor_forward(x, scale, zero_point, quant_min, quant_max, compute_mask, relu)
    )


def fake_quant_per_channel_default(x, scale, zero_point, axis, quant_min, quant_max, compute_mask=True):
    return _with_layout(
        x,
        *reference.fake_quant_per_channel_forward(
            x, scale, zero_point, axis, quant_min, quant_max, compute_mask
        ),
    )


def binarize_default(x, clipped_ste=True, compute_mask=True):
    return _with_layout(x, *reference.binarize_forward(x, clipped_ste, compute_mask))


def bn_fold_fake_quant_weight_default(
    weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, compute_mask=True, divide_by_fold=False
):
    return _with_layout(
        weight,
        *reference.bn_fold_fake_quant_weight_forward(
            weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, compute_mask, divide_by_fold
        ),
    )


def masked_grad_default(grad, mask):
    return _like(reference.masked_grad(grad, mask), grad)


def bn_fold_fake_quant_weight_backward_default(
    grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, divide_by_fold=False
):
    grad_weight, grad_gamma, grad_var = reference.bn_fold_fake_quant_weight_backward(
        grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, divide_by_fold
    )
    return _like(grad_weight, weight), grad_gamma, grad_var


def observe_range_default(
    x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, symmetric, fold=None,
    relu=False,
):
    reference.observe_range(
        x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, symmetric, fold, relu
    )


def fake_quant_learnable_default(x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    # Composite: the per-tensor / per-channel op of whichever backend is chosen, without a mask. The values of the
    # scale and of an integer zero point are checked by that op (a learned one is clamped into the range first).
    reference.check_learnable_args(x, scale, zero_point, axis, quant_min, quant_max, grad_factor, check_values=False)
    zero_point = reference.learnable_zero_point(zero_point, quant_min, quant_max)
    if axis is None:
        return torch.ops.fakequant.fake_quant_per_tensor(x, scale, zero_point, quant_min, quant_max, False)[0]
    return torch.ops.fakequant.fake_quant_per_channel(x, scale, zero_point, axis, quant_min, quant_max, False)[0]


def fake_quant_per_group_implicit(x, scale, zero_point, group_size, quant_min, quant_max, compute_mask=True):
    reference.check_per_group_args(x, scale, zero_point, group_size)
    out, mask = torch.ops.fakequant.fake_quant_per_channel(
        reference.per_group_view(x, group_size), scale.reshape(-1), zero_point.reshape(-1), 0, quant_min, quant_max,
        compute_mask,
    )
    return out.reshape(x.shape), mask.reshape(x.shape) if compute_mask else mask


def fake_quant_learnable_backward_default(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    return reference.fake_quant_learnable_backward(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor)


DEFAULT_KERNELS = {
    "fake_quant_per_tensor": fake_quant_per_tensor_default,
    "fake_quant_per_channel": fake_quant_per_channel_default,
    "binarize": binarize_default,
    "bn_fold_fake_quant_weight": bn_fold_fake_quant_weight_default,
    "masked_grad": masked_grad_default,
    "bn_fold_fake_quant_weight_backward": bn_fold_fake_quant_weight_backward_default,
    "observe_range": observe_range_default,
    "fake_quant_learnable": fake_quant_learnable_default,
    "fake_quant_learnable_backward": fake_quant_learnable_backward_default,
}

for _name, _kernel in DEFAULT_KERNELS.items():
    torch.library.impl(f"{LIBRARY}::{_name}", "default", lib=_lib)(_kernel)
torch.library.impl(f"{LIBRARY}::fake_quant_per_group", "CompositeImplicitAutograd", lib=_lib)(
    fake_quant_per_group_implicit
)


# ---------------------------------------------------------------------------------------------
# Fake impls: shapes, dtypes and strides only.
# ---------------------------------------------------------------------------------------------


def _fake_outputs(x: torch.Tensor, compute_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.bool) if compute_mask else x.new_empty(0, dtype=torch.bool)
    return out, mask


@torch.library.register_fake(f"{LIBRARY}::fake_quant_per_tensor", lib=_lib)
def _(x, scale, zero_point, quant_min, quant_max, compute_mask=True, relu=False):
    reference.check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, check_values=False)
    return _fake_outputs(x, compute_mask)


@torch.library.register_fake(f"{LIBRARY}::fake_quant_per_channel", lib=_lib)
def _(x, scale, zero_point, axis, quant_min, quant_max, compute_mask=True):
    reference.check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis, check_values=False)
    return _fake_outputs(x, compute_mask)


@torch.library.register_fake(f"{LIBRARY}::binarize", lib=_lib)
def _(x, clipped_ste=True, compute_mask=True):
    reference.check_binarize_args(x)
    return _fake_outputs(x, clipped_ste and compute_mask)


@torch.library.register_fake(f"{LIBRARY}::bn_fold_fake_quant_weight", lib=_lib)
def _(weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, compute_mask=True, divide_by_fold=False):
    reference.check_bn_fold_args(
        weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, check_values=False
    )
    return _fake_outputs(weight, compute_mask)


@torch.library.register_fake(f"{LIBRARY}::masked_grad", lib=_lib)
def _(grad, mask):
    return torch.empty_like(grad)


@torch.library.register_fake(f"{LIBRARY}::bn_fold_fake_quant_weight_backward", lib=_lib)
def _(grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, divide_by_fold=False):
    reference.check_bn_fold_backward_args(
        grad, weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, check_values=False
    )
    return torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(var)


@torch.library.register_fake(f"{LIBRARY}::observe_range", lib=_lib)
def _(
    x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, symmetric, fold=None,
    relu=False,
):
    reference.check_observe_range_args(
        x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, fold
    )


@torch.library.register_fake(f"{LIBRARY}::fake_quant_learnable", lib=_lib)
def _(x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    reference.check_learnable_args(x, scale, zero_point, axis, quant_min, quant_max, grad_factor, check_values=False)
    return torch.empty_like(x)


@torch.library.register_fake(f"{LIBRARY}::fake_quant_learnable_backward", lib=_lib)
def _(grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    reference.check_learnable_backward_args(
        grad, x, scale, zero_point, axis, quant_min, quant_max, grad_factor, check_values=False
    )
    return (torch.empty_like(x), torch.empty_like(scale, dtype=torch.float32),
            torch.empty_like(zero_point, dtype=torch.float32))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Autograd: straight-through estimators. Scales and zero points get no gradient, except in the learnable op.
# csrc/autograd.cpp computes the same in C++; tests/test_autograd.py checks that both agree bit for bit.
# ---------------------------------------------------------------------------------------------


def _require_mask(ctx) -> torch.Tensor:
    if not ctx.compute_mask:
        raise RuntimeError(
            "fakequant: this op ran with compute_mask=False, so it has no mask to differentiate with; "
            "call it with compute_mask=True (the functional wrappers do so whenever a gradient is needed)"
        )
    return ctx.saved_tensors[0]


def _save_mask(ctx, compute_mask, output):
    # The bool mask output never has a gradient: don't let autograd fill zeros for it on every step.
    ctx.set_materialize_grads(False)
    ctx.compute_mask = compute_mask
    ctx.save_for_backward(output[1])


def _fake_quant_per_tensor_setup(ctx, inputs, output):
    _save_mask(ctx, inputs[5], output)


def _fake_quant_per_channel_setup(ctx, inputs, output):
    _save_mask(ctx, inputs[6], output)


def _fake_quant_per_tensor_backward(ctx, grad_out, _grad_mask):
    if grad_out is None:
        return None, None, None, None, None, None, None
    return torch.ops.fakequant.masked_grad(grad_out, _require_mask(ctx)), None, None, None, None, None, None


def _fake_quant_per_channel_backward(ctx, grad_out, _grad_mask):
    if grad_out is None:
        return None, None, None, None, None, None, None
    grad_x = torch.ops.fakequant.masked_grad(grad_out, _require_mask(ctx))
    return grad_x, None, None, None, None, None, None


def _binarize_setup(ctx, inputs, output):
    x, clipped_ste, compute_mask = inputs
    ctx.set_materialize_grads(False)
    ctx.clipped_ste = clipped_ste
    ctx.compute_mask = compute_mask
    ctx.save_for_backward(output[1])


def _binarize_backward(ctx, grad_out, _grad_mask):
    if grad_out is None or not ctx.clipped_ste:
        return grad_out, None, None
    return torch.ops.fakequant.masked_grad(grad_out, _require_mask(ctx)), None, None


def _bn_fold_setup(ctx, inputs, output):
    weight, gamma, var, eps, scale, zero_point, quant_min, quant_max, _, divide_by_fold = inputs
    ctx.set_materialize_grads(False)
    ctx.eps, ctx.quant_min, ctx.quant_max, ctx.divide_by_fold = eps, quant_min, quant_max, divide_by_fold
    # The backward recomputes the forward, which needs these qparams; copies, because a quantizer updates its
    # scale/zero-point buffers in place on the next forward, which may come before this backward.
    ctx.save_for_backward(weight, gamma, var, scale.clone(), zero_point.clone())


def _bn_fold_backward(ctx, grad_out, _grad_mask):
    if grad_out is None:
        return None, None, None, None, None, None, None, None, None, None
    weight, gamma, var, scale, zero_point = ctx.saved_tensors
    grad_weight, grad_gamma, grad_var = torch.ops.fakequant.bn_fold_fake_quant_weight_backward(
        grad_out, weight, gamma, var, ctx.eps, scale, zero_point, ctx.quant_min, ctx.quant_max, ctx.divide_by_fold
    )
    return grad_weight, grad_gamma, grad_var, None, None, None, None, None, None, None


def _learnable_setup(ctx, inputs, output):
    x, scale, zero_point, axis, quant_min, quant_max, grad_factor = inputs
    ctx.set_materialize_grads(False)
    ctx.arguments = (axis, quant_min, quant_max, grad_factor)
    ctx.zero_point_learned = zero_point.is_floating_point()
    # Copies of the parameters: an optimizer step may update them in place before this backward runs.
    ctx.save_for_backward(x, scale.detach().clone(), zero_point.detach().clone())


def _learnable_backward(ctx, grad_out):
    if grad_out is None:
        return None, None, None, None, None, None, None
    x, scale, zero_point = ctx.saved_tensors
    grad_x, grad_scale, grad_zero_point = torch.ops.fakequant.fake_quant_learnable_backward(
        grad_out, x, scale, zero_point, *ctx.arguments
    )
    return grad_x, grad_scale, grad_zero_point if ctx.zero_point_learned else None, None, None, None, None


PYTHON_AUTOGRAD = {
    "fake_quant_per_tensor": (_fake_quant_per_tensor_backward, _fake_quant_per_tensor_setup),
    "fake_quant_per_channel": (_fake_quant_per_channel_backward, _fake_quant_per_channel_setup),
    "binarize": (_binarize_backward, _binarize_setup),
    "bn_fold_fake_quant_weight": (_bn_fold_backward, _bn_fold_setup),
    "fake_quant_learnable": (_learnable_backward, _learnable_setup),
}


def register_python_autograd() -> tuple[str, ...]:
    """Registers the Python autograd of each differentiable op that has no autograd kernel yet.

    Called after loading ``fakequant._C`` has been tried: ``_C``'s C++ autograd kernels, when loaded, do the
    same at a fraction of the per-call cost, and registering a second kernel on the Autograd key would
    override one with the other (with a warning). Calling it again registers nothing.

    Returns:
        The names of the ops it registered.
    """
    registered = []
    for name, (backward, setup_context) in PYTHON_AUTOGRAD.items():
        qualname = f"{LIBRARY}::{name}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"):
            continue
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_lib)
        registered.append(name)
    return tuple(registered)
