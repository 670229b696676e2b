"""The quantizer machinery shared by every algorithm: selecting modules, hooks, state, steps and export.

Design (why hooks and a parametrization):

* **Weights** use ``torch.nn.utils.parametrize``: ``module.weight`` becomes the output of a small
  :class:`WeightFakeQuant` module applied to the float master parameter, which stays registered as
  ``module.parametrizations.weight.original``. It is the same ``Parameter`` object as before
  ``compress()``, so an optimizer built earlier keeps updating it, the fake-quantized weight is recomputed
  from it on every forward, and ``remove_parametrizations(..., leave_parametrized=False)`` gives the plain
  float module back. Nothing replaces ``forward``; the module's own code reads ``self.weight`` as always.
* **Inputs** are quantized by a forward pre-hook and **outputs** by a forward hook.
* **State** (scales, zero points, tracked ranges, observation flags) is held in buffers named
  ``fakequant_*`` registered on the quantized module itself, and the step counter in the buffer
  ``fakequant_step`` on the root model. Buffers, unlike child modules, do not change what an
  ``nn.Sequential`` runs, so any model can be quantized, and everything appears in ``model.state_dict()``.
  Python mirrors of the step and of the "range initialised" flags keep ``.item()`` syncs off the hot path;
  a load_state_dict post-hook refreshes them, so a loaded checkpoint resumes exactly.

Extension points for subclasses (BatchNorm folding plugs in here):

* :meth:`Quantizer._wrap_modules` chooses and wraps the modules (one call of :meth:`Quantizer._wrap_module`
  per selected module, which returns the :class:`QuantizedLayer` handling it);
* :meth:`Quantizer._on_step` runs once per training step, after the step counter advanced, and calls
  :meth:`QuantizedLayer.on_step` of every layer;
* :meth:`Quantizer.calibration` builds the export dict from :meth:`QuantizedLayer.calibration`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils import parametrize

from fakequant import functional
from fakequant.qdq import OnnxQDQ, onnx_qdq_range
from fakequant.qparams import PerChannel, PerGroup, QuantSpec, choose_qparams
from fakequant.quantizers.config import AlgorithmRules, LayerConfig, resolve_config_list

__all__ = ["Quantizer", "QuantizedLayer", "WeightFakeQuant", "BUFFER_PREFIX", "STEP_BUFFER"]

BUFFER_PREFIX = "fakequant_"
STEP_BUFFER = BUFFER_PREFIX + "step"


class WeightFakeQuant(nn.Module):
    """Parametrization that returns the fake-quantized weight computed from the float master weight.

    Holds no state itself: the layer's buffers live on the quantized module, so the state_dict keys do not
    depend on the parametrization internals.
    """

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__()
        self.layer = layer  # a plain object, not a submodule

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.layer.quantizer.quantize_weight(self.layer, weight)


class QuantizedLayer:
    """One quantized module: its configuration, its hooks and its ``fakequant_*`` buffers.

    Args:
        quantizer: the quantizer that owns the layer.
        name: qualified module name.
        module: the module.
        config: its resolved configuration.
    """

    def __init__(self, quantizer: Quantizer, name: str, module: nn.Module, config: LayerConfig) -> None:
        self.quantizer = quantizer
        self.name = name
        self.module = module
        self.config = config
        self.observed: dict[str, bool] = {}  # mirrors of the fakequant_<type>_observed buffers
        self._handles: list = []
        self._relu_output: torch.Tensor | None = None  # from the ReLU pre-hook to the output hook
        self._own_hook_ids: set[int] = set()
        self._buffer_names: list[str] = []
        self._parameter_names: list[str] = []

    # -- state ------------------------------------------------------------------------------------
    def add_buffer(self, name: str, value: torch.Tensor, persistent: bool = True) -> None:
        """Registers ``fakequant_<name>`` on the module (persistent ones are in the state_dict)."""
        full = BUFFER_PREFIX + name
        if hasattr(self.module, full):
            raise ValueError(f"module {self.name!r} already has an attribute {full!r}; was it quantized twice?")
        self.module.register_buffer(full, value.to(self.quantizer.device), persistent=persistent)
        self._buffer_names.append(full)

    def add_parameter(self, name: str, value: torch.Tensor) -> nn.Parameter:
        """Registers ``fakequant_<name>`` as an ``nn.Parameter`` of the module (a learned scale or zero point):
        in ``model.parameters()`` and the state_dict, removed again by :meth:`detach`."""
        full = BUFFER_PREFIX + name
        if hasattr(self.module, full):
            raise ValueError(f"module {self.name!r} already has an attribute {full!r}; was it quantized twice?")
        parameter = nn.Parameter(value.to(self.quantizer.device))
        self.module.register_parameter(full, parameter)
        self._parameter_names.append(full)
        return parameter

    def parameter(self, name: str) -> nn.Parameter:
        return self.module._parameters[BUFFER_PREFIX + name]

    def learned_parameters(self) -> list[nn.Parameter]:
        """The parameters :meth:`add_parameter` registered, in registration order."""
        return [self.module._parameters[name] for name in self._parameter_names]

    def buffer(self, name: str) -> torch.Tensor:
        return self.module._buffers[BUFFER_PREFIX + name]

    def sync_from_buffers(self) -> None:
        """Refreshes the Python mirrors after a state_dict was loaded."""
        for quant_type in self.observed:
            self.observed[quant_type] = bool(self.buffer(quant_type + "_observed").item())

    def active(self) -> bool:
        """True once the step counter has reached this layer's ``quant_start_step``."""
        return self.quantizer._step >= self.config.quant_start_step

    # -- hooks ------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Registers the weight parametrization and the input/output hooks the config asks for."""
        quant_types = self.config.quant_types
        if "weight" in quant_types:
            parametrize.register_parametrization(self.module, "weight", WeightFakeQuant(self))
        if "input" in quant_types:
            self._handles.append(self.module.register_forward_pre_hook(self._input_hook))
        if "output" in quant_types:
            if type(self.module) is nn.ReLU and not self.module.inplace:
                self._handles.append(self.module.register_forward_pre_hook(self._relu_pre_hook))
            self._handles.append(self.module.register_forward_hook(self._output_hook))
        self._own_hook_ids = {handle.id for handle in self._handles}

    def add_hook_handle(self, handle) -> None:
        self._handles.append(handle)
        self._own_hook_ids.add(handle.id)

    def detach(self) -> None:
        """Removes the hooks, the parametrization and the buffers; the module is a plain float module again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._own_hook_ids.clear()
        self._relu_output = None
        if parametrize.is_parametrized(self.module, "weight"):
            parametrize.remove_parametrizations(self.module, "weight", leave_parametrized=False)
        for name in self._buffer_names:
            del self.module._buffers[name]
        self._buffer_names.clear()
        for name in self._parameter_names:
            del self.module._parameters[name]
        self._parameter_names.clear()

    def _input_hook(self, module: nn.Module, args: tuple):
        if not args or not isinstance(args[0], torch.Tensor):
            raise ValueError(
                f"fakequant: module {self.name!r} has 'input' quantization but its first positional argument is "
                f"{type(args[0]).__name__ if args else 'missing'}; allowed: a tensor as first positional argument"
            )
        return (self.quantizer.quantize_input(self, args[0]), *args[1:])

    def _only_own_hooks(self, module: nn.Module) -> bool:
        own = self._own_hook_ids
        return (
            own.issuperset(module._forward_pre_hooks) and own.issuperset(module._forward_hooks)
            and not module._backward_hooks and not module._backward_pre_hooks
            and not module_hooks._global_forward_pre_hooks and not module_hooks._global_forward_hooks
            and not module_hooks._global_backward_hooks and not module_hooks._global_backward_pre_hooks
        )

    def _relu_pre_hook(self, module: nn.Module, args: tuple):
        # An out-of-place nn.ReLU whose output is quantized: the quantizer may compute that output from the
        # input alone (QAT: the fused ReLU + fake quant op, one pass forward and one masked pass backward). The
        # ReLU then runs on an empty placeholder, and the output hook returns the quantized output. Not done when
        # other hooks (forward or backward, on the module or global) watch it: they would see the placeholder.
        self._relu_output = None
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or not self._only_own_hooks(module):
            return None
        output = self.quantizer.quantize_relu_input(self, args[0])
        if output is None:
            return None
        self._relu_output = output
        return (args[0].new_empty(0),)

    def _output_hook(self, module: nn.Module, args: tuple, output):
        if self._relu_output is not None:
            output, self._relu_output = self._relu_output, None
            return output
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"fakequant: module {self.name!r} has 'output' quantization but returned "
                f"{type(output).__name__}; allowed: modules that return one tensor"
            )
        return self.quantizer.quantize_output(self, output)

    # -- per step and export ----------------------------------------------------------------------
    def on_step(self, step: int) -> None:
        """Called once per training step (after the counter advanced) via :meth:`Quantizer._on_step`."""
        self.quantizer._update_layer_on_step(self, step)

    def calibration(self) -> dict:
        """The export record of this layer (see :meth:`Quantizer.calibration`)."""
        return self.quantizer._layer_calibration(self)


def _ddp_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Quantizer:
    """Base class of the NNI-style quantizers.

    Args:
        model: the model to quantize (modified in place by :meth:`compress`).
        config_list: NNI config dicts (SPEC §3).
        optimizer: if given, each ``optimizer.step()`` advances the quantizer's step counter (through
            ``register_step_post_hook``). Without one, call :meth:`step` after each optimizer step.

    Example:
        >>> import fakequant
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU6())
        >>> fakequant.QAT_Quantizer(model, [{'quant_types': ['weight'], 'op_types': ['Linear']}]).compress()
        Sequential(...)
    """

    rules: AlgorithmRules
    #: the config_list used when none is given (None: a config_list is required)
    default_config_list: list[dict] | None = None

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"{type(self).__name__}: model must be a torch.nn.Module, got {type(model).__name__}")
        if config_list is None:
            if self.default_config_list is None:
                raise ValueError(f"{type(self).__name__}: config_list is required")
            config_list = self.default_config_list
        if optimizer is not None and type(optimizer).__name__.endswith("Evaluator"):
            raise ValueError(
                f"{type(self).__name__}: got an NNI evaluator ({type(optimizer).__name__}) where fakequant takes a "
                "torch.optim.Optimizer. NNI 3.0's quantizers train through the evaluator; fakequant's attach to the "
                "model and you train with your own loop: pass the optimizer the evaluator was built with, "
                f"{type(self).__name__}(model, config_list, optimizer), call compress(), then train"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"{type(self).__name__}: optimizer must be a torch.optim.Optimizer or None, got "
                f"{type(optimizer).__name__}"
            )
        self.bound_model = model
        self.config_list = config_list
        self.optimizer = optimizer
        self.layer_configs: dict[str, LayerConfig] = resolve_config_list(model, config_list, self.rules)
        self.layers: dict[str, QuantizedLayer] = {}
        self._step = 0
        self.device = torch.device("cpu")
        self._compressed = False
        self._handles: list = []

    # -- lifecycle --------------------------------------------------------------------------------
    def compress(self, *nni3_training_args: Any) -> nn.Module:
        """Attaches the quantization to the model in place and returns the model.

        Args:
            nni3_training_args: none. NNI 3.0's ``compress(max_steps, max_epochs)`` trains through its evaluator;
                fakequant's does not train, and given them raises a ValueError that says so.

        Returns:
            The same model object, now fake-quantized in its forward pass.
        """
        if nni3_training_args:
            raise ValueError(
                f"{type(self).__name__}.compress{nni3_training_args!r}: compress() takes no arguments. NNI 3.0's "
                "compress(max_steps, max_epochs) trains and returns (model, calibration_config); fakequant's attaches "
                "the quantization and returns the model: call compress(), train with your own loop, then "
                "export_model(...) (or calibration()) for the calibration config"
            )
        if self._compressed:
            raise ValueError(f"{type(self).__name__}: compress() was already called; call unwrap() first")
        model = self.bound_model
        if hasattr(model, STEP_BUFFER):
            raise ValueError(f"the model already has {STEP_BUFFER!r}: it is quantized by another quantizer")
        tensors = [*model.parameters(), *model.buffers()]
        # the state lives where the model lives (the ops need scales on the device of what they quantize)
        self.device = tensors[0].device if tensors else torch.device("cpu")
        model.register_buffer(STEP_BUFFER, torch.tensor(self._step, dtype=torch.int64, device=self.device))
        self._wrap_modules()
        self._handles.append(model.register_load_state_dict_post_hook(self._after_load))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_post_hook(lambda *_: self.step()))
        self._compressed = True
        return model

    def _wrap_modules(self) -> None:
        """Chooses the modules to quantize and wraps each one (override to replace modules, e.g. Conv+BN)."""
        modules = dict(self.bound_model.named_modules())
        for name, config in self.layer_configs.items():
            self.layers[name] = self._wrap_module(name, modules[name], config)

    def _wrap_module(self, name: str, module: nn.Module, config: LayerConfig) -> QuantizedLayer:
        layer = QuantizedLayer(self, name, module, config)
        self._init_layer_state(layer)  # buffers first: the parametrization is evaluated once on registration
        layer.attach()
        return layer

    def unwrap(self) -> nn.Module:
        """Removes every hook, parametrization and ``fakequant_*`` buffer: the model is a plain float model.

        Returns:
            The model, whose ``forward`` is again the float computation with the current float weights.
        """
        for layer in self.layers.values():
            layer.detach()
        self.layers.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.bound_model._buffers.pop(STEP_BUFFER, None)
        self._compressed = False
        return self.bound_model

    # -- steps ------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Training steps taken so far (the counter ``quant_start_step`` is compared with)."""
        return self._step

    def step(self) -> None:
        """Advances the step counter by one; call it after ``optimizer.step()`` unless the optimizer was
        passed to the constructor (then it is called for you)."""
        self._step += 1
        self.bound_model._buffers[STEP_BUFFER].fill_(self._step)
        self._on_step()

    def _on_step(self) -> None:
        """Everything that happens once per training step, after the counter advanced."""
        with torch.no_grad():
            for layer in self.layers.values():
                layer.on_step(self._step)

    def _update_layer_on_step(self, layer: QuantizedLayer, step: int) -> None:
        """Per-layer work after a step (BNN clamps its weights here). Nothing by default."""

    def _after_load(self, module: nn.Module, incompatible_keys) -> None:
        self._step = int(self.bound_model._buffers[STEP_BUFFER].item())
        for layer in self.layers.values():
            layer.sync_from_buffers()

    # -- the algorithm (subclasses) ---------------------------------------------------------------
    def _init_layer_state(self, layer: QuantizedLayer) -> None:
        """Registers the layer's ``fakequant_*`` buffers."""
        raise NotImplementedError

    def quantize_weight(self, layer: QuantizedLayer, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_input(self, layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_output(self, layer: QuantizedLayer, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_relu_input(self, layer: QuantizedLayer, relu_input: torch.Tensor) -> torch.Tensor | None:
        """The quantized output of an out-of-place ``nn.ReLU`` computed from its input, or None (the default) to
        let the ReLU run and quantize its output with :meth:`quantize_output`."""
        return None

    def _layer_calibration(self, layer: QuantizedLayer) -> dict:
        raise NotImplementedError

    def _onnx_qdq(self, layer: QuantizedLayer, quant_type: str) -> OnnxQDQ | None:
        """How the eval-mode model fake-quantizes ``quant_type`` of ``layer``, for the ONNX export.

        Returns:
            The tensor's QuantizeLinear/DequantizeLinear form, or None where the eval-mode forward leaves it
            in float (before ``quant_start_step``).

        Raises:
            ValueError: the tensor has no Q/DQ form (the message names the layer, the quant type and why).
        """
        raise ValueError(
            f"layer {layer.name!r} {quant_type}: {type(self).__name__} has no QuantizeLinear/DequantizeLinear "
            "export; allowed: QAT_Quantizer, NaiveQuantizer and LsqQuantizer"
        )

    # -- shared helpers ---------------------------------------------------------------------------
    def _add_qparam_buffers(self, layer: QuantizedLayer, quant_type: str, channels: int | None) -> None:
        shape = () if channels is None else (channels,)
        layer.add_buffer(quant_type + "_scale", torch.ones(shape, dtype=torch.float32))
        layer.add_buffer(quant_type + "_zero_point", torch.zeros(shape, dtype=torch.int32))

    @staticmethod
    def _weight_axis(layer: QuantizedLayer) -> int | None:
        granularity = layer.config.specs["weight"].granularity
        return granularity.axis if isinstance(granularity, PerChannel) else None

    @staticmethod
    def _weight_group_size(layer: QuantizedLayer) -> int | None:
        granularity = layer.config.specs["weight"].granularity
        return granularity.group_size if isinstance(granularity, PerGroup) else None

    def _add_weight_state(self, layer: QuantizedLayer) -> None:
        """Scale and zero point of a weight whose range is taken from the current weight on every forward."""
        axis = self._weight_axis(layer)
        group_size = self._weight_group_size(layer)
        weight_shape = layer.module.weight.shape
        if group_size is not None:  # [out, in / group_size] scales; the range op sees the flat view of the groups
            shape = (weight_shape[0], weight_shape[1] // group_size)
            layer.add_buffer("weight_scale", torch.ones(shape, dtype=torch.float32))
            layer.add_buffer("weight_zero_point", torch.zeros(shape, dtype=torch.int32))
            layer.add_buffer("weight_range", torch.zeros((2, shape[0] * shape[1])), persistent=False)
            return
        channels = None if axis is None else weight_shape[axis]
        self._add_qparam_buffers(layer, "weight", channels)
        # The op's scratch for the range: recomputed on every forward, so not part of the state_dict.
        layer.add_buffer("weight_range", torch.zeros((2,) if channels is None else (2, channels)), persistent=False)

    def _observe_weight(self, layer: QuantizedLayer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sets the weight's scale and zero point buffers from the range of ``weight`` (one fused op) and
        returns them."""
        spec = layer.config.specs["weight"]
        scale, zero_point = layer.buffer("weight_scale"), layer.buffer("weight_zero_point")
        group_size = self._weight_group_size(layer)
        if group_size is not None:  # the per-channel range of the [out * in / group_size, group_size] view
            torch.ops.fakequant.observe_range(
                weight.detach().reshape(-1, group_size), layer.buffer("weight_range"), scale.view(-1),
                zero_point.view(-1), 0, 1.0, spec.quant_min, spec.quant_max, spec.symmetric,
            )
            return scale, zero_point
        torch.ops.fakequant.observe_range(
            weight.detach(), layer.buffer("weight_range"), scale, zero_point, self._weight_axis(layer), 1.0,
            spec.quant_min, spec.quant_max, spec.symmetric,
        )
        return scale, zero_point

    def _minmax_fake_quant_weight(self, layer: QuantizedLayer, weight: torch.Tensor) -> torch.Tensor:
        """Weight ranges taken from the current weight on every forward (tracked from step 0), fake
        quantization from ``quant_start_step``."""
        spec = layer.config.specs["weight"]
        scale, zero_point = self._observe_weight(layer, weight)
        if not layer.active():
            return weight
        # .float(): model.half() casts float buffers too, and the ops take fp32 scales (no copy if fp32)
        scale = scale.float()
        group_size = self._weight_group_size(layer)
        if group_size is not None:
            return functional.fake_quant_per_group(weight, scale, zero_point, group_size, spec.quant_min,
                                                   spec.quant_max)  # fmt: skip
        axis = self._weight_axis(layer)
        if axis is not None:
            return functional.fake_quant_per_channel(weight, scale, zero_point, axis, spec.quant_min, spec.quant_max)
        return functional.fake_quant_per_tensor(weight, scale, zero_point, spec.quant_min, spec.quant_max)

    @staticmethod
    def _spec_record(prefix: str, spec: QuantSpec) -> dict:
        record = {
            f"{prefix}_bits": spec.bits,
            f"{prefix}_quant_min": spec.quant_min,
            f"{prefix}_quant_max": spec.quant_max,
            f"{prefix}_symmetric": spec.symmetric,
        }
        if isinstance(spec.granularity, PerChannel):
            record[f"{prefix}_axis"] = spec.granularity.axis
        return record

    # -- export -----------------------------------------------------------------------------------
    def calibration(self) -> dict[str, dict]:
        """The per-layer calibration records, keyed by qualified module name.

        Each record holds, for every quant type of the layer, ``<type>_bits``, ``<type>_quant_min`` /
        ``<type>_quant_max``, ``<type>_scale`` / ``<type>_zero_point`` (fp32 / int32 tensors on the CPU) and,
        for activations, the tracked range as ``tracked_min_<type>`` / ``tracked_max_<type>`` (NNI's names).

        Returns:
            ``{layer_name: record}``.
        """
        return {name: layer.calibration() for name, layer in self.layers.items()}

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state_dict as the unwrapped float model would have it: float master weights under
        their own names (``conv.weight``), and no ``fakequant_*`` buffers."""
        marker = ".parametrizations.weight.original"
        out = {}
        for key, value in self.bound_model.state_dict().items():
            if key.rsplit(".", 1)[-1].startswith(BUFFER_PREFIX):
                continue
            if key.endswith(marker) or key == marker[1:]:
                key = key[: -len(marker)] + ".weight" if key != marker[1:] else "weight"
            out[key] = value.detach().clone()
        return out

    def export_model(
        self,
        model_path: str | os.PathLike,
        calibration_path: str | os.PathLike | None = None,
        onnx_path: str | os.PathLike | None = None,
        input_shape: tuple[int, ...] | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, dict]:
        """Saves the float weights and the calibration records and, optionally, an ONNX model, as NNI's
        ``export_model``.

        The ONNX model (``onnx_path``) is the quantized network in eval-mode inference form: every tensor the
        model fake-quantizes is a QuantizeLinear -> DequantizeLinear pair with the layer's scale and zero point
        (per channel with ``axis``), so ONNX Runtime or TensorRT can build an int8 model from it. Weights are
        stored as the eval forward computes them (already fake-quantized, on the quantization grid) and a
        BN-folded Conv+BN is one conv with the folded weight and bias. Activations need exactly int8
        ``[-128, 127]`` or uint8 ``[0, 255]``; weights any range inside one of them (e.g. narrow
        ``[-127, 127]``, 4-bit). Other ranges (9 to 16 bits, 2- to 7-bit activations), DoReFa weights and
        BNN's binarization raise ``ValueError`` listing every such tensor, before any file is written. A
        tensor the eval-mode model still computes in float (before ``quant_start_step``) is exported in float,
        with a warning. The training mode of every module is restored afterwards. Details:
        :mod:`fakequant.onnx_export`. Needs the packages ``onnx`` and ``onnxscript``; the export uses torch's
        dynamo-based ``torch.onnx.export``.

        Args:
            model_path: where ``torch.save`` writes the float state_dict (:meth:`float_state_dict`).
            calibration_path: where ``torch.save`` writes the calibration dict, if given.
            onnx_path: where the ONNX model is written, if given (one file; its tensors go to
                ``<onnx_path>.data`` only when the weights exceed 1 GiB).
            input_shape: the shape of the dummy input the model is traced with; required with ``onnx_path``.
                The ONNX model has this static input shape.
            device: the dummy input's device (default: the model's device).

        Returns:
            The calibration dict (:meth:`calibration`).

        Raises:
            ValueError: ``onnx_path`` without ``input_shape``, or quantized tensors without a Q/DQ form.
            ImportError: ``onnx_path`` given but onnx or onnxscript is not installed.

        Example:
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
            >>> quantizer = QAT_Quantizer(model, [{'quant_types': ['weight', 'input'], 'quant_bits': 8,
            ...                                    'op_types': ['Conv2d']}])  # doctest: +SKIP
            >>> _ = quantizer.compress()  # doctest: +SKIP
            >>> # ... train a few steps, so that the input range is observed ...
            >>> calibration = quantizer.export_model("model.pth", "calibration.pth", onnx_path="model.onnx",
            ...                                      input_shape=(1, 3, 32, 32))  # doctest: +SKIP
        """
        if onnx_path is not None:
            from fakequant.onnx_export import export_onnx

            # first: a model that cannot be exported raises before any file is written
            export_onnx(self, onnx_path, input_shape, device)
        torch.save(self.float_state_dict(), model_path)
        calibration = self.calibration()
        if calibration_path is not None:
            torch.save(calibration, calibration_path)
        return calibration


class EmaRangeQuantizer(Quantizer):
    """A quantizer whose activations are fake-quantized with EMA-tracked ranges (QAT).

    Args:
        sync_ranges: with ``torch.distributed`` initialised, all-reduce every observed activation range
            (min of mins, max of maxes) before the EMA update, so every rank holds the same ranges and
            scales. Turn it off only to compare.
    """

    #: EMA decay of the activation ranges (SPEC §2)
    ema_decay = 0.99

    def __init__(self, model, config_list=None, optimizer=None, *, sync_ranges: bool = True) -> None:
        super().__init__(model, config_list, optimizer)
        self.sync_ranges = sync_ranges

    def _add_activation_state(self, layer: QuantizedLayer, quant_type: str) -> None:
        self._add_qparam_buffers(layer, quant_type, None)
        # [min, max]; meaningful once fakequant_<type>_observed is 1
        layer.add_buffer(quant_type + "_range", torch.zeros(2, dtype=torch.float32))
        layer.add_buffer(quant_type + "_observed", torch.zeros((), dtype=torch.int64))
        layer.observed[quant_type] = False

    def _observe(self, layer: QuantizedLayer, quant_type: str, x: torch.Tensor, relu: bool = False) -> None:
        """Moves the tracked range towards this batch's min and max (of ``relu(x)`` with ``relu``; all-reduced
        under DDP), then sets the scale and zero point from it."""
        spec = layer.config.specs[quant_type]
        tracked = layer.buffer(quant_type + "_range")
        scale, zero_point = layer.buffer(quant_type + "_scale"), layer.buffer(quant_type + "_zero_point")
        first = not layer.observed[quant_type]
        torch.ops.fakequant.observe_range(
            x, tracked, scale, zero_point, None, 1.0 if first else 1.0 - self.ema_decay,
            spec.quant_min, spec.quant_max, spec.symmetric, None, relu,
        )
        if self.sync_ranges and _ddp_initialized():
            # The update tracked + c * (batch - tracked) is monotonic in the batch range (each rounded
            # operation is), and the ranks start from the same tracked range: reducing the updated ranges
            # (min of the minima, max of the maxima) gives exactly the update with the all-reduced batch range.
            extremes = torch.stack((-tracked[0].float(), tracked[1].float()))
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
            tracked.copy_(torch.stack((-extremes[0], extremes[1])))
            new_scale, new_zero_point = choose_qparams(
                -extremes[0], extremes[1], spec.quant_min, spec.quant_max, spec.symmetric
            )
            scale.copy_(new_scale)
            zero_point.copy_(new_zero_point)
        if first:
            layer.buffer(quant_type + "_observed").fill_(1)
            layer.observed[quant_type] = True

    def load_calibration_config(self, calibration_config: dict[str, dict]) -> None:
        """Sets activation ranges, scales and zero points from calibration records, as NNI 2.x's method does.

        The records are those :meth:`calibration` returns and :meth:`export_model` saves (``tracked_min_<type>``
        and ``tracked_max_<type>`` for inputs and outputs). Weight ranges follow the weights on every forward and
        are not loaded; to resume training exactly, save and load ``model.state_dict()``, which holds all of it.

        Args:
            calibration_config: ``{layer_name: record}`` for layers of this quantizer, after :meth:`compress`.

        Raises:
            ValueError: called before :meth:`compress`, or a layer name this quantizer does not quantize.

        Example:
            >>> calibration = trained_quantizer.calibration()  # doctest: +SKIP
            >>> fresh_quantizer.compress()  # doctest: +SKIP
            >>> fresh_quantizer.load_calibration_config(calibration)  # doctest: +SKIP
        """
        if not self._compressed:
            raise ValueError(f"{type(self).__name__}.load_calibration_config: call compress() first")
        unknown = sorted(set(calibration_config) - set(self.layers))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}.load_calibration_config: {unknown} are not quantized by this quantizer; "
                f"allowed: its layers {sorted(self.layers)}"
            )
        for name, record in calibration_config.items():
            layer = self.layers[name]
            for quant_type in layer.config.quant_types:
                low, high = record.get(f"tracked_min_{quant_type}"), record.get(f"tracked_max_{quant_type}")
                if quant_type != "weight" and low is not None and high is not None:
                    self.set_activation_range(layer, quant_type, torch.tensor(float(low)), torch.tensor(float(high)))

    def set_activation_range(
        self, layer: QuantizedLayer, quant_type: str, low: torch.Tensor, high: torch.Tensor
    ) -> None:
        """Makes ``[low, high]`` the tracked range of ``layer``'s input or output, with the scale and zero point
        that follow (SPEC §2), as if it had been observed: what calibration and loaded records set."""
        spec = layer.config.specs[quant_type]
        tracked = layer.buffer(quant_type + "_range")
        tracked.copy_(torch.stack([low, high]).to(tracked))
        scale, zero_point = choose_qparams(tracked[0], tracked[1], spec.quant_min, spec.quant_max, spec.symmetric)
        layer.buffer(quant_type + "_scale").copy_(scale)
        layer.buffer(quant_type + "_zero_point").copy_(zero_point)
        layer.buffer(quant_type + "_observed").fill_(1)
        layer.observed[quant_type] = True

    def _fake_quant_activation(
        self, layer: QuantizedLayer, quant_type: str, x: torch.Tensor, relu: bool = False
    ) -> torch.Tensor:
        """Ranges tracked in training mode from step 0; fake quantization from ``quant_start_step`` once a
        range has been observed (an eval pass before any training batch runs in float). With ``relu``, the
        activation is ``relu(x)``, observed and fake-quantized without forming it (the fused op's mask holds
        ReLU's gradient too)."""
        if layer.module.training:
            with torch.no_grad():
                self._observe(layer, quant_type, x, relu)
        if not (layer.active() and layer.observed[quant_type]):
            return torch.relu(x) if relu else x
        spec = layer.config.specs[quant_type]
        return functional.fake_quant_per_tensor(
            x,
            # .float(): model.half() casts float buffers too, and the ops take fp32 scales (no copy if fp32)
            layer.buffer(quant_type + "_scale").float(), layer.buffer(quant_type + "_zero_point"),
            spec.quant_min, spec.quant_max, relu=relu,
        )

    def _onnx_qdq(self, layer: QuantizedLayer, quant_type: str) -> OnnxQDQ | None:
        if quant_type == "weight":
            return super()._onnx_qdq(layer, quant_type)
        spec = layer.config.specs[quant_type]
        quant_min, quant_max = onnx_qdq_range(layer.name, quant_type, spec.quant_min, spec.quant_max, constant=False)
        if not (layer.active() and layer.observed[quant_type]):
            return None  # _fake_quant_activation returns x unchanged in eval mode
        return OnnxQDQ(
            scale=layer.buffer(quant_type + "_scale").detach().float().clone(),
            zero_point=layer.buffer(quant_type + "_zero_point").detach().to(torch.int32).clone(),
            quant_min=quant_min,
            quant_max=quant_max,
        )

    def _activation_record(self, layer: QuantizedLayer, quant_type: str) -> dict:
        tracked = layer.buffer(quant_type + "_range").detach().cpu()
        observed = layer.observed[quant_type]
        record = self._spec_record(quant_type, layer.config.specs[quant_type])
        record.update({
            f"tracked_min_{quant_type}": float(tracked[0]) if observed else None,
            f"tracked_max_{quant_type}": float(tracked[1]) if observed else None,
            f"{quant_type}_scale": layer.buffer(quant_type + "_scale").detach().cpu().clone(),
            f"{quant_type}_zero_point": layer.buffer(quant_type + "_zero_point").detach().cpu().clone(),
        })
        return record

