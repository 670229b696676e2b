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

The algorithm of a subclass is its hooks, each called per layer: the abstract :meth:`Quantizer.init_layer_state`,
:meth:`~Quantizer.quantize_weight`, :meth:`~Quantizer.quantize_input`, :meth:`~Quantizer.quantize_output` and
:meth:`~Quantizer.layer_calibration`, and the optional :meth:`~Quantizer.quantize_relu_input`,
:meth:`~Quantizer.update_layer_on_step` and :meth:`~Quantizer.onnx_qdq` (with ``exports_onnx_qdq = True``).
The min/max weight ranges and EMA activation ranges that QAT and Naive share are in
:mod:`fakequant.quantizers.ema_range`.

Extension points of the machinery (BatchNorm folding plugs in here):

* :meth:`Quantizer._wrap_modules` chooses and wraps the modules (one call of :meth:`Quantizer._wrap_module`
  per selected module, which returns the :class:`QuantizedLayer` handling it);
* :meth:`Quantizer._on_step` runs once per training step, after the step counter advanced, and calls
  :meth:`QuantizedLayer.on_step` of every layer;
* :meth:`Quantizer.calibration` builds the export dict from :meth:`QuantizedLayer.calibration`.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import os
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils import parametrize

from fakequant.qdq import OnnxQDQ
from fakequant.quantizers.config import AlgorithmRules, LayerConfig, resolve_config_list

__all__ = [
    "Quantizer",
    "QuantizedLayer",
    "WeightFakeQuant",
    "BUFFER_PREFIX",
    "STEP_BUFFER",
    "quantizer_classes",
    "onnx_qdq_quantizer_names",
]

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

    def state_names(self) -> list[str]:
        """The module attribute names of the layer's buffers and parameters (``fakequant_*``)."""
        return [*self._buffer_names, *self._parameter_names]

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
        self.quantizer.update_layer_on_step(self, step)

    def calibration(self) -> dict:
        """The export record of this layer (see :meth:`Quantizer.calibration`)."""
        return self.quantizer.layer_calibration(self)


def quantizer_classes() -> list[type[Quantizer]]:
    """The quantizer algorithms fakequant offers: the concrete :class:`Quantizer` classes in
    ``fakequant.quantizers.__all__``, in its order, each once (``QATQuantizer`` is ``QAT_Quantizer``).

    Example:
        >>> [cls.__name__ for cls in quantizer_classes()]
        ['BNNQuantizer', 'DoReFaQuantizer', 'LsqQuantizer', 'NaiveQuantizer', 'QAT_Quantizer']
    """
    package = importlib.import_module("fakequant.quantizers")  # not at the top: the package imports this module
    classes: list[type[Quantizer]] = []
    for name in package.__all__:
        value = getattr(package, name)
        if (isinstance(value, type) and issubclass(value, Quantizer) and not inspect.isabstract(value)
                and value not in classes):
            classes.append(value)
    return classes


def onnx_qdq_quantizer_names() -> str:
    """The names of the quantizers that declare ``exports_onnx_qdq``, as a phrase for error messages.

    Example:
        >>> onnx_qdq_quantizer_names()
        'LsqQuantizer, NaiveQuantizer and QAT_Quantizer'
    """
    names = [cls.__name__ for cls in quantizer_classes() if cls.exports_onnx_qdq]
    return " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " and " + names[-1]


class Quantizer(abc.ABC):
    """Base class of the NNI-style quantizers.

    Args:
        model: the model to quantize (modified in place by :meth:`compress`).
        config_list: NNI config dicts (docs/numerics.md, Quantizers and config_list).
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
    #: whether :meth:`onnx_qdq` describes the quantized tensors as ONNX QuantizeLinear/DequantizeLinear pairs
    #: (export_model(onnx_path=...)); the error messages list the classes that set it
    exports_onnx_qdq: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.exports_onnx_qdq and cls.onnx_qdq is Quantizer.onnx_qdq:
            raise TypeError(f"{cls.__name__} sets exports_onnx_qdq = True but does not override onnx_qdq, which "
                            "refuses every tensor")

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
        self._handles.append(model.register_load_state_dict_pre_hook(self._before_load))
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
        self.init_layer_state(layer)  # buffers first: the parametrization is evaluated once on registration
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

    def update_layer_on_step(self, layer: QuantizedLayer, step: int) -> None:
        """Hook: per-layer work after a step (BNN clamps its weights here). Nothing by default."""
        return None

    def _before_load(self, module: nn.Module, state_dict, prefix: str, *_args) -> None:
        """Refuses a checkpoint whose quantizer state holds NaN or inf, before anything is copied: a scale, range
        or learned step that fakequant wrote is finite, so such a value was saved after a fault (a non-finite
        batch) and would break every later step (docs/numerics.md, Non-finite inputs)."""
        for layer in self.layers.values():
            for full in layer.state_names():
                key = prefix + (layer.name + "." if layer.name else "") + full
                value = state_dict.get(key)
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all()):
                    bad = value.flatten()[~value.flatten().isfinite()][0].item()
                    raise ValueError(
                        f"{type(self).__name__}: the checkpoint's {key} holds non-finite values "
                        f"({bad}); the quantizer's scales and ranges "
                        "are finite, so it was saved after a fault corrupted them: load an earlier checkpoint, or "
                        "drop the quantizer state from this one (strict=False) so that it is observed again"
                    )

    def _after_load(self, module: nn.Module, incompatible_keys) -> None:
        self._step = int(self.bound_model._buffers[STEP_BUFFER].item())
        for layer in self.layers.values():
            layer.sync_from_buffers()

    # -- the algorithm (subclasses) ---------------------------------------------------------------
    @abc.abstractmethod
    def init_layer_state(self, layer: QuantizedLayer) -> None:
        """Hook: registers the layer's ``fakequant_*`` buffers and parameters (called before the hooks attach)."""

    @abc.abstractmethod
    def quantize_weight(self, layer: QuantizedLayer, weight: torch.Tensor) -> torch.Tensor:
        """Hook: the fake-quantized weight, computed from the float master ``weight`` on every forward."""

    @abc.abstractmethod
    def quantize_input(self, layer: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
        """Hook: the fake-quantized first positional input of the module."""

    @abc.abstractmethod
    def quantize_output(self, layer: QuantizedLayer, y: torch.Tensor) -> torch.Tensor:
        """Hook: the fake-quantized output of the module."""

    def quantize_relu_input(self, layer: QuantizedLayer, relu_input: torch.Tensor) -> torch.Tensor | None:
        """Hook: the quantized output of an out-of-place ``nn.ReLU`` computed from its input, or None (the default)
        to let the ReLU run and quantize its output with :meth:`quantize_output`."""
        return None

    @abc.abstractmethod
    def layer_calibration(self, layer: QuantizedLayer) -> dict:
        """Hook: the layer's calibration record (see :meth:`calibration`)."""

    def onnx_qdq(self, layer: QuantizedLayer, quant_type: str) -> OnnxQDQ | None:
        """Hook: how the eval-mode model fake-quantizes ``quant_type`` of ``layer``, for the ONNX export.

        Overridden by the classes that set ``exports_onnx_qdq``; this default refuses the tensor.

        Returns:
            The tensor's QuantizeLinear/DequantizeLinear form, or None where the eval-mode forward leaves it
            in float (before ``quant_start_step``).

        Raises:
            ValueError: the tensor has no Q/DQ form (the message names the layer, the quant type and why).
        """
        raise ValueError(
            f"layer {layer.name!r} {quant_type}: {type(self).__name__} has no QuantizeLinear/DequantizeLinear "
            f"export; allowed: {onnx_qdq_quantizer_names()}"
        )

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

