"""ONNX export of a quantized model in inference form, with QuantizeLinear/DequantizeLinear (Q/DQ) pairs.

:meth:`fakequant.Quantizer.export_model` calls :func:`export_onnx` when given ``onnx_path``. How it works:

1. The model is put in eval mode (each module's training flag is restored afterwards, also on error).
2. The quantizer describes every tensor it fake-quantizes in eval mode as an :class:`OnnxQDQ` (its
   ``onnx_qdq`` hook): scale, zero point, the 8-bit ONNX range and, for weights, the constant weight.
   A weight is the tensor the eval forward itself computes, already fake-quantized by the fakequant op on
   the layer's own range (for a BN-folded Conv+BN, :meth:`fakequant.bn_fold.ConvBnQAT.inference_weight_and_bias`:
   ``q(w * f)`` and the folded bias, exported as one conv). Its values lie on the quantization grid, so
   QuantizeLinear gives back exactly the layer's integer levels and DequantizeLinear exactly the PyTorch
   values. Tensors that the eval forward leaves in float (before ``quant_start_step``, or an activation
   whose range was never observed) get no Q/DQ, with a warning. Tensors with no Q/DQ form raise one
   ``ValueError`` listing them all, before anything is written.
3. For the export only, the quantizer's ``quantize_weight`` / ``quantize_input`` / ``quantize_output``
   (called by the hooks and weight parametrizations) and the ``forward`` of each folded ConvBnQAT are
   shadowed by instance attributes that apply ``torch.fake_quantize_per_tensor_affine`` /
   ``torch.fake_quantize_per_channel_affine`` with those constants: ops that the ONNX exporter (torch's
   dynamo-based ``torch.onnx.export``, with onnxscript) turns into QuantizeLinear -> DequantizeLinear, per
   channel with ``axis``. Their fp32 numerics are bit-identical to fakequant's (docs/numerics.md, Per-tensor
   fake quantization); the export form is checked to give exactly the eval-mode output on the dummy input
   before it is exported.
4. The constants are attached to their module for the duration of the export, so the ONNX initializers
   carry readable names: ``<layer>.fakequant_onnx_weight`` (the fake-quantized weight),
   ``<layer>.fakequant_onnx_<type>_scale`` / ``_zero_point``, ``<layer>.fakequant_onnx_bias`` (folded bias).

Which ranges have a Q/DQ form: ONNX's 8-bit QuantizeLinear saturates to int8 ``[-128, 127]`` or uint8
``[0, 255]``. Activations (inputs/outputs) must use exactly one of those two ranges, since Q/DQ cannot
clamp to a narrower one. Weights are constants already clamped by the fakequant op, so any range inside
one of them is exact too (NaiveQuantizer's narrow ``[-127, 127]``, 2- to 7-bit weights: int8/uint8 Q/DQ
holding the layer's levels and scale). Wider ranges (9 to 16 bits), DoReFa weights (a grid without a zero
level) and BNN's binarization have no Q/DQ form and are refused. Which quantizers export at all is declared by
their class (``Quantizer.exports_onnx_qdq``); the others' ``onnx_qdq`` refuses every tensor.

Nothing here imports ``onnx`` or ``onnxscript`` at module level: ``import fakequant`` stays light.
"""

from __future__ import annotations

import contextlib
import importlib
import operator
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from fakequant.qdq import INT8_RANGE, UINT8_RANGE, OnnxQDQ, onnx_qdq_range

__all__ = ["ExportableQuantizer", "OnnxQDQ", "export_onnx", "onnx_qdq_range", "INT8_RANGE", "UINT8_RANGE"]


class ExportableQuantizer(Protocol):
    """What :func:`export_onnx` reads of a quantizer (every :class:`fakequant.Quantizer` has it)."""

    bound_model: nn.Module
    layers: dict[str, Any]  # name -> QuantizedLayer
    device: torch.device
    _compressed: bool

    def onnx_qdq(self, layer: Any, quant_type: str) -> OnnxQDQ | None: ...


#: prefix of the module attributes that name the exported constants
ATTR_PREFIX = "fakequant_onnx_"

# Above this many bytes of weights the ONNX file keeps its tensors in "<onnx_path>.data" (protobuf's 2 GB
# limit); below it the model is one file, as NNI's export writes it.
_EXTERNAL_DATA_BYTES = 1 << 30


def _import_exporter_deps() -> Any:
    try:
        importlib.import_module("onnxscript")  # the dynamo-based torch.onnx.export translates with it
        return importlib.import_module("onnx")
    except ImportError as error:
        raise ImportError(
            f"fakequant: ONNX export needs the packages onnx and onnxscript ({error}); install them with "
            "`pip install onnx onnxscript` (and onnxruntime to run the exported model)"
        ) from error


def _check_input_shape(input_shape: object) -> tuple[int, ...]:
    if input_shape is None:
        raise ValueError(
            "fakequant: export_model(onnx_path=...) needs input_shape, the shape of the dummy input the model "
            "is traced with (e.g. input_shape=(1, 3, 224, 224)); allowed: a sequence of positive ints"
        )
    try:
        if isinstance(input_shape, (str, bytes)) or any(isinstance(d, bool) for d in input_shape):
            raise TypeError
        shape = tuple(operator.index(d) for d in input_shape)
    except TypeError:
        shape = ()
    if not shape or min(shape) <= 0:
        raise ValueError(f"fakequant: input_shape={input_shape!r}; allowed: a non-empty sequence of positive ints")
    return shape


def _plans(quantizer: ExportableQuantizer) -> dict[str, dict[str, OnnxQDQ | None]]:
    """Every quantized tensor's Q/DQ form (None: float in eval mode); one ValueError lists all refusals."""
    plans: dict[str, dict[str, OnnxQDQ | None]] = {}
    problems = []
    for name, layer in quantizer.layers.items():
        plans[name] = {}
        for quant_type in layer.config.quant_types:
            try:
                with torch.no_grad():
                    plans[name][quant_type] = quantizer.onnx_qdq(layer, quant_type)
            except ValueError as error:
                message = str(error)
                problems.append(message if message.startswith("layer ") else f"layer {name!r} {quant_type}: {message}")
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise ValueError(
            f"fakequant: ONNX export of {type(quantizer).__name__}: {len(problems)} quantized tensor(s) have no "
            f"QuantizeLinear/DequantizeLinear form:\n{listed}"
        )
    for name, layer_plans in plans.items():
        for quant_type, plan in layer_plans.items():
            if plan is None:
                warnings.warn(
                    f"fakequant ONNX export: layer {name!r} {quant_type} is not fake-quantized by the eval-mode "
                    f"model yet (quant_start_step not reached, or no activation range observed in training), "
                    f"so it is exported in float, without QuantizeLinear/DequantizeLinear",
                    UserWarning, stacklevel=4,
                )
    return plans


@contextlib.contextmanager
def _export_form(quantizer: ExportableQuantizer, plans: dict[str, dict[str, OnnxQDQ | None]]) -> Iterator[None]:
    """Within it, the model computes its eval-mode output with torch's fake-quantize ops on the constants."""
    from fakequant.bn_fold import ConvBnQAT

    def quantize_weight(layer, weight: torch.Tensor) -> torch.Tensor:
        plan = plans[layer.name].get("weight")
        return weight if plan is None else plan.apply(plan.tensor)

    def activation(quant_type: str):
        def quantize(layer, x: torch.Tensor) -> torch.Tensor:
            plan = plans[layer.name].get(quant_type)
            return x if plan is None else plan.apply(x)
        return quantize

    def folded_forward(module: ConvBnQAT, plan: OnnxQDQ):
        def forward(x: torch.Tensor) -> torch.Tensor:
            return module.conv._conv_forward(x, plan.apply(plan.tensor), plan.bias)
        return forward

    quantize_output = activation("output")

    def quantize_relu_input(layer, relu_input: torch.Tensor) -> None:
        return None  # the export form runs the ReLU and quantizes its output

    overrides = {"quantize_weight": quantize_weight, "quantize_input": activation("input"),
                 "quantize_output": quantize_output, "quantize_relu_input": quantize_relu_input}
    attached: list[tuple[nn.Module, str]] = []
    try:
        for attr, function in overrides.items():
            setattr(quantizer, attr, function)  # an instance attribute shadows the method
        for name, layer in quantizer.layers.items():
            module = layer.module
            for quant_type, plan in plans[name].items():
                if plan is None:
                    continue
                for attr, value in plan.named_tensors(quant_type).items():
                    # a plain (non-buffer) tensor attribute: torch.export names the lifted constant after it
                    object.__setattr__(module, ATTR_PREFIX + attr, value)
                    attached.append((module, ATTR_PREFIX + attr))
            weight_plan = plans[name].get("weight")
            if isinstance(module, ConvBnQAT) and weight_plan is not None:
                module.forward = folded_forward(module, weight_plan)
                attached.append((module, "forward"))
        yield
    finally:
        for attr in overrides:
            quantizer.__dict__.pop(attr, None)
        for module, attr in attached:
            module.__dict__.pop(attr, None)


def _leaves(output: Any) -> list[torch.Tensor]:
    return [leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _check_export_form(expected: Any, got: Any) -> None:
    expected, got = _leaves(expected), _leaves(got)
    same = len(expected) == len(got) and all(
        e.shape == g.shape and e.dtype == g.dtype and torch.equal(e.isnan(), g.isnan())
        and torch.equal(e.nan_to_num(), g.nan_to_num())
        for e, g in zip(expected, got, strict=True)
    )
    if not same:
        raise RuntimeError(
            "fakequant: ONNX export: the model rewritten with torch.fake_quantize_* ops for the exporter does not "
            "reproduce the eval-mode output bit for bit on the dummy input, so the exported model would compute "
            "something else; not exported (a fake-quant call the export does not know of?)"
        )


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def export_onnx(
    quantizer: ExportableQuantizer,
    onnx_path: str | os.PathLike,
    input_shape: Sequence[int],
    device: torch.device | str | None = None,
    *,
    opset_version: int | None = None,
) -> None:
    """Writes the quantizer's model to ``onnx_path`` in eval-mode inference form with Q/DQ pairs.

    See the module docstring for what is exported and which ranges are allowed. The model's training
    flags (per module) are restored afterwards. The file is checked with ``onnx.checker``.

    Args:
        quantizer: a quantizer after :meth:`~fakequant.Quantizer.compress`.
        onnx_path: where the ``.onnx`` file goes (its tensors go to ``<onnx_path>.data`` beside it only
            when the weights exceed 1 GiB).
        input_shape: the shape of the dummy input (``torch.randn``, fixed seed) the model is traced with; the
            ONNX model has this static input shape, as NNI's export.
        device: the dummy input's device (default: the model's device).
        opset_version: the ONNX opset (default: the exporter's; per-channel Q/DQ needs 13 or later).

    Raises:
        ValueError: no ``input_shape``, a model not compressed, or quantized tensors without a Q/DQ form
            (all listed, with the layer, the range and what is allowed).
        ImportError: onnx or onnxscript is not installed.

    Example:
        >>> export_onnx(quantizer, "model.onnx", input_shape=(1, 3, 32, 32))  # doctest: +SKIP
    """
    shape = _check_input_shape(input_shape)
    if not quantizer._compressed:
        raise ValueError(f"fakequant: ONNX export: {type(quantizer).__name__}.compress() was not called")
    onnx = _import_exporter_deps()
    model = quantizer.bound_model
    device = torch.device(device) if device is not None else quantizer.device
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        plans = _plans(quantizer)
        dummy = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            expected = model(dummy)
        with _export_form(quantizer, plans):
            with torch.no_grad():
                _check_export_form(expected, model(dummy))
            torch.onnx.export(
                model, (dummy,), onnx_path, dynamo=True, verbose=False, opset_version=opset_version,
                external_data=_tensor_bytes(model) > _EXTERNAL_DATA_BYTES,
            )
    finally:
        for module, training in modes.items():
            module.training = training
    onnx.checker.check_model(os.fspath(onnx_path))
