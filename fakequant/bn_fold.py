"""BatchNorm folding for quantization-aware training: Conv+BN pairs trained with folded, fake-quantized weights.

At inference a Conv followed by a BatchNorm is one conv with the weight ``w * f`` and the bias
``beta + (b - mean) * f``, where ``f = gamma / sqrt(var + eps)`` per output channel. Quantizing the
unfolded ``w`` during training therefore quantizes the wrong tensor. :class:`ConvBnQAT` trains with the
folded weight, fake-quantized per channel by the fused ``fakequant::bn_fold_fake_quant_weight`` op,
while BatchNorm keeps the statistics of the unquantized Conv+BN (torch.ao's single-conv scheme):

* training, statistics live: ``f`` from the running variance; ``y = conv(x, q(w * f)) / f + b``
  (computed as ``conv(x, q(w * f) / f, b)``, the fused op's ``divide_by_fold``);
  ``out = bn(y)`` with batch statistics. Without quantization ``conv(x, w * f) / f == conv(x, w)``, so
  BN sees the float conv output up to quantization noise, and its running statistics are those of the
  float model.
* statistics frozen (:meth:`ConvBnQAT.freeze_bn_stats`), eval and export: the folded inference
  computation itself, ``out = conv(x, q(w * f), beta + (b - mean) * f)`` with running statistics.

:func:`find_conv_bn_pairs` finds the pairs with ``torch.fx`` (or a recorded forward pass when the model
cannot be traced); :func:`fold_conv_bn` swaps them in and :func:`unfold_conv_bn` restores the original
modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from fakequant import reference
from fakequant.ops.bn_fold import bn_fold_fake_quant_weight, fold_bias
from fakequant.qparams import PerChannel, QuantSpec

__all__ = [
    "ConvBnQAT",
    "find_conv_bn_pairs",
    "fold_conv_bn",
    "unfold_conv_bn",
    "conv_bn_modules",
]


@torch.library.custom_op("fakequant::_running_stat_copy", mutates_args=())
def _running_stat_copy(stat: torch.Tensor) -> torch.Tensor:
    """A copy of a BN running statistic that torch.compile keeps as a copy.

    Under torch.compile (torch 2.14.1, inductor and aot_eager alike), a tensor computed with aten ops (clone,
    ``* 1.0``) from a buffer that the same graph then mutates, here ``running_var`` updated by BN, and saved for
    backward is recomputed from the buffer, so the backward sees the mutated value: the BN fold's backward
    recomputed its mask from the next running variance (conv weight gradients off by 10-30% per channel in
    tests/test_bn_fold.py's compile test, gamma's 0.9% of their norm). A custom op's output is saved as it is.
    """
    return stat.clone()


@_running_stat_copy.register_fake
def _(stat: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(stat)


def _copy_running_stat(stat: torch.Tensor) -> torch.Tensor:
    """``stat.clone()``; when compiling, through :func:`_running_stat_copy` (eager keeps the cheaper clone)."""
    return _running_stat_copy(stat) if torch.compiler.is_compiling() else stat.clone()


# Conv class -> the BatchNorm class of the same dimensionality.
_CONV_TO_BN: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}


def _conv_type(module: nn.Module) -> type[nn.Module] | None:
    for conv_type in _CONV_TO_BN:
        if isinstance(module, conv_type):
            return conv_type
    return None


def _is_matching_bn(conv: nn.Module, bn: nn.Module) -> bool:
    conv_type = _conv_type(conv)
    if conv_type is None:
        return False
    bn_ok = isinstance(bn, _CONV_TO_BN[conv_type]) or type(bn) is nn.SyncBatchNorm
    return bn_ok and bn.num_features == conv.out_channels and bn.track_running_stats


# ---------------------------------------------------------------------------------------------
# Pair finding
# ---------------------------------------------------------------------------------------------


def _pairs_from_fx(model: nn.Module) -> list[tuple[str, str]]:
    graph_module = torch.fx.symbolic_trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or _conv_type(modules.get(node.target)) is None:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn_node = users[0]
        # The conv output must be BN's only argument (not also, say, its weight).
        if bn_node.args != (node,) or bn_node.kwargs:
            continue
        if calls[node.target] != 1 or calls[bn_node.target] != 1:
            continue  # a module called twice cannot be replaced by one fused module
        if _is_matching_bn(modules[node.target], modules[bn_node.target]):
            pairs.append((node.target, bn_node.target))
    return pairs


class _TensorUseRecorder(TorchFunctionMode):
    """Counts, per watched tensor, the torch calls made outside conv and BN forwards that take it as an argument.

    Tensors are keyed by ``id``; only watched tensors (kept alive by the caller) are counted, because the id of
    a freed temporary can be reused by a later tensor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0  # depth of conv/BN forwards being run
        self.uses: dict[int, int] = {}  # id of a watched tensor -> uses so far

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside == 0:
            for value in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(value, torch.Tensor) and id(value) in self.uses:
                    self.uses[id(value)] += 1
        return func(*args, **kwargs)


def _pairs_from_forward(model: nn.Module, example_inputs: Any) -> list[tuple[str, str]]:
    """Pairs from one recorded forward pass: a conv output consumed by one BN call and by nothing else."""
    names = {module: name for name, module in model.named_modules()}
    convs = {m for m in names if _conv_type(m) is not None}
    bns = {m for m in names if isinstance(m, _BatchNorm)}
    recorder = _TensorUseRecorder()
    calls: dict[str, int] = {}
    conv_outputs: dict[int, str] = {}
    bn_inputs: dict[int, list[str]] = {}
    keep_alive: list[torch.Tensor] = []  # ids stay unique only while the tensors live

    def pre_hook(module, args):
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        if module in bns and len(args) == 1 and isinstance(args[0], torch.Tensor):
            bn_inputs.setdefault(id(args[0]), []).append(name)
            keep_alive.append(args[0])
        recorder.inside += 1

    def post_hook(module, args, output):
        recorder.inside -= 1
        if module in convs and isinstance(output, torch.Tensor):
            conv_outputs[id(output)] = names[module]
            recorder.uses[id(output)] = 0
            keep_alive.append(output)

    handles = []
    for module in convs | bns:
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    was_training = model.training
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        model.eval()  # no running-statistics update from the dummy pass
        with torch.no_grad(), recorder:
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    modules = dict(model.named_modules())
    pairs = []
    for tensor_id, conv_name in conv_outputs.items():
        consumers = bn_inputs.get(tensor_id, [])
        if len(consumers) != 1 or recorder.uses.get(tensor_id, 0) != 0:
            continue
        bn_name = consumers[0]
        if calls[conv_name] != 1 or calls[bn_name] != 1:
            continue
        if _is_matching_bn(modules[conv_name], modules[bn_name]):
            pairs.append((conv_name, bn_name))
    return pairs


def find_conv_bn_pairs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """Finds the Conv1d/2d/3d whose output feeds only a BatchNorm of the same dimensionality and width.

    The model is traced with ``torch.fx.symbolic_trace``. A conv qualifies when its output has exactly
    one user, a call of a ``BatchNorm1d/2d/3d`` (matching the conv's dimensionality, tracking running
    statistics) with ``num_features == out_channels``, and neither module is called more than once. A ReLU
    after the BN may follow; it stays where it is.

    When the model cannot be traced (data-dependent control flow), ``example_inputs`` allows a fallback:
    one forward pass in eval mode under ``torch.no_grad`` records, with module hooks and a
    ``TorchFunctionMode``, which conv outputs are consumed by a BN call and by nothing else.

    Args:
        model: the float model.
        example_inputs: a tensor or tuple of positional inputs for the fallback forward pass.

    Returns:
        ``[(conv_name, bn_name), ...]`` with qualified module names, in graph order.

    Raises:
        ValueError: the model cannot be traced and no ``example_inputs`` were given (the message asks for
            them or for explicit pairs).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> find_conv_bn_pairs(net)
        [('0', '1')]
    """
    try:
        return _pairs_from_fx(model)
    except Exception as error:  # fx raises TraceError, TypeError, ... on untraceable Python code
        if example_inputs is None:
            raise ValueError(
                f"find_conv_bn_pairs: torch.fx could not trace {type(model).__name__} "
                f"({type(error).__name__}: {error}); pass example_inputs=... so that Conv+BN pairs can be found "
                "from a forward pass, or give the pairs explicitly as [(conv_name, bn_name), ...]"
            ) from error
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    return sorted(_pairs_from_forward(model, example_inputs), key=lambda pair: order[pair[0]])


# ---------------------------------------------------------------------------------------------
# The fused Conv+BN module
# ---------------------------------------------------------------------------------------------


def _flag(value: bool) -> torch.Tensor:
    return torch.tensor(bool(value))


class ConvBnQAT(nn.Module):
    """A Conv1d/2d/3d and the BatchNorm after it, trained with the BN-folded, fake-quantized weight.

    The original ``conv`` and ``bn`` are kept as submodules (their parameters and buffers stay in the
    state dict, the optimizer keeps updating them, and :func:`unfold_conv_bn` puts them back). Modes:

    * fake quant disabled (before ``quant_start_step``): ``bn(conv(x))``, the float model; with frozen
      statistics BN uses its running statistics.
    * training, statistics live: ``f = gamma / sqrt(running_var + eps)``,
      ``y = conv(x, bn_fold_fake_quant_weight(w, gamma, running_var, ...)) / f + b``, ``out = bn(y)``
      with batch statistics, which update BN's running statistics as the float Conv+BN would. The division
      by ``f`` is applied to the quantized weight (``conv(x, q(w f) / f)``, the same by linearity) rather than
      to the activations, which is much cheaper.
    * training with frozen statistics, eval, export: ``conv(x, q(w * f), fold_bias(b, beta, mean, ...))``,
      the folded inference computation with running statistics; nothing updates the statistics.

    The weight's scale and zero point come from the folded weight's range on every forward (per output
    channel, or per tensor), observed by the ``fakequant::observe_range`` op from the range of ``w`` and ``f``
    without forming ``w * f`` (see :func:`fakequant.reference.batch_range`), and are kept in the buffers
    ``weight_scale`` / ``weight_zero_point``. The bool buffers ``fake_quant_enabled`` and ``bn_frozen``
    make the mode part of the state dict.

    A channel whose ``gamma`` is exactly 0 (zero-initialised residual branches) would make the training
    path divide by ``f = 0``; there the weight is quantized unfolded (``f`` taken as 1), which BN then
    multiplies by 0 as the float model does. The frozen and eval paths fold the true ``gamma``.

    Args:
        conv: a ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.
        bn: the BatchNorm applied to its output, ``num_features == conv.out_channels``, tracking running
            statistics.
        weight_spec: how the folded weight is quantized; ``PerChannel`` must use axis 0.
        quant_start_step: :meth:`update_step` enables fake quantization from this step on.
        freeze_bn_step: :meth:`update_step` freezes the BN statistics from this step on (None: never).

    Example:
        >>> conv, bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        >>> fused = ConvBnQAT(conv, bn, QuantSpec(bits=8, granularity=PerChannel(0)))
        >>> fused(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 8, 6, 6])
    """

    def __init__(
        self,
        conv: nn.Module,
        bn: nn.Module,
        weight_spec: QuantSpec | None = None,
        quant_start_step: int = 0,
        freeze_bn_step: int | None = None,
    ) -> None:
        super().__init__()
        self.check_pair(conv, bn)
        weight_spec = weight_spec if weight_spec is not None else QuantSpec(bits=8, granularity=PerChannel(0))
        if not isinstance(weight_spec, QuantSpec):
            raise ValueError(f"ConvBnQAT: weight_spec must be a QuantSpec, got {weight_spec!r}")
        granularity = weight_spec.granularity
        if granularity.axis is not None and granularity.axis not in (0, -conv.weight.dim()):
            raise ValueError(
                f"ConvBnQAT: a BN-folded weight is quantized per output channel (axis 0) or per tensor, "
                f"got {weight_spec.granularity!r}"
            )
        if freeze_bn_step is not None and (not isinstance(freeze_bn_step, int) or freeze_bn_step < 0):
            raise ValueError(f"ConvBnQAT: freeze_bn_step must be None or an int >= 0, got {freeze_bn_step!r}")
        if not isinstance(quant_start_step, int) or quant_start_step < 0:
            raise ValueError(f"ConvBnQAT: quant_start_step must be an int >= 0, got {quant_start_step!r}")
        self.conv = conv
        self.bn = bn
        self.weight_spec = weight_spec
        self.quant_start_step = quant_start_step
        self.freeze_bn_step = freeze_bn_step
        self.per_channel = weight_spec.granularity.axis is not None
        channels = conv.out_channels if self.per_channel else 1
        device = conv.weight.device
        self.register_buffer("weight_scale", torch.ones(channels, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(channels, dtype=torch.int32, device=device))
        # The op's scratch for the folded weight's range, recomputed on every forward (not in the state_dict).
        range_shape = (2, channels) if self.per_channel else (2,)
        self.register_buffer("weight_range", torch.zeros(range_shape, device=device), persistent=False)
        self.register_buffer("fake_quant_enabled", _flag(True).to(device))
        self.register_buffer("bn_frozen", _flag(False).to(device))
        # Python mirrors of the two flags: reading a CUDA buffer on every forward would sync the device.
        self._fake_quant_on = True
        self._frozen = False
        self.register_load_state_dict_post_hook(ConvBnQAT._sync_flags)

    @staticmethod
    def check_pair(conv: nn.Module, bn: nn.Module) -> None:
        """Raises ``ValueError`` unless ``bn`` can be folded into ``conv``.

        Example:
            >>> ConvBnQAT.check_pair(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        """
        if _conv_type(conv) is None:
            raise ValueError(f"ConvBnQAT: conv must be a Conv1d, Conv2d or Conv3d, got {type(conv).__name__}")
        if not isinstance(bn, _BatchNorm):
            raise ValueError(f"ConvBnQAT: bn must be a BatchNorm1d/2d/3d, got {type(bn).__name__}")
        if not _is_matching_bn(conv, bn):
            raise ValueError(
                f"ConvBnQAT: {type(bn).__name__}(num_features={bn.num_features}, "
                f"track_running_stats={bn.track_running_stats}) cannot be folded into "
                f"{type(conv).__name__}(out_channels={conv.out_channels}); allowed: the BatchNorm of the conv's "
                "dimensionality with num_features == out_channels and track_running_stats=True"
            )

    # -- mode ------------------------------------------------------------------------------------

    @staticmethod
    def _sync_flags(module: ConvBnQAT, incompatible_keys) -> None:
        module._fake_quant_on = bool(module.fake_quant_enabled)
        module._frozen = bool(module.bn_frozen)

    def enable_fake_quant(self, enabled: bool = True) -> ConvBnQAT:
        """Switches weight fake quantization on or off (off: the float Conv+BN)."""
        self._fake_quant_on = bool(enabled)
        self.fake_quant_enabled.fill_(self._fake_quant_on)
        return self

    def freeze_bn_stats(self, frozen: bool = True) -> ConvBnQAT:
        """Freezes (or unfreezes) the BN statistics: frozen training uses and keeps the running statistics."""
        self._frozen = bool(frozen)
        self.bn_frozen.fill_(self._frozen)
        return self

    def update_step(self, step: int) -> None:
        """Sets both modes from an optimizer step count: ``quant_start_step`` and ``freeze_bn_step``."""
        self.enable_fake_quant(step >= self.quant_start_step)
        self.freeze_bn_stats(self.freeze_bn_step is not None and step >= self.freeze_bn_step)

    # -- folding ---------------------------------------------------------------------------------

    def _gamma_beta(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        if bn.affine:
            return bn.weight, bn.bias
        ones = torch.ones(bn.num_features, device=bn.running_var.device)
        return ones, torch.zeros_like(ones)

    def _update_qparams(self, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of ``w * factor`` per channel (or per tensor), stored in the buffers."""
        spec = self.weight_spec
        torch.ops.fakequant.observe_range(
            self.conv.weight.detach(), self.weight_range, self.weight_scale, self.weight_zero_point,
            0 if self.per_channel else None, 1.0, spec.quant_min, spec.quant_max, spec.symmetric,
            factor.detach().float(),
        )
        # .float(): model.half() makes the buffers fp16, and the op takes fp32 scales (no copy if fp32)
        scale, zero_point = self.weight_scale.float(), self.weight_zero_point
        if self.per_channel:
            return scale, zero_point
        channels = self.conv.out_channels
        return scale.expand(channels).contiguous(), zero_point.expand(channels).contiguous()

    def _fake_quant_folded(self, gamma: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        factor = reference.bn_fold_factor(gamma, var, self.bn.eps)
        scale, zero_point = self._update_qparams(factor)
        spec = self.weight_spec
        return bn_fold_fake_quant_weight(
            self.conv.weight, gamma, var, self.bn.eps, scale, zero_point, spec.quant_min, spec.quant_max
        )

    def inference_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fake-quantized folded weight ``q(w * f)`` and the folded bias of the frozen/eval forward.

        Exactly what :meth:`forward` convolves with in eval mode (or training with frozen statistics) while
        fake quantization is enabled; it also refreshes ``weight_scale`` / ``weight_zero_point`` as that
        forward does. The ONNX export uses it.

        Example:
            >>> fused = ConvBnQAT(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
            >>> [t.shape for t in fused.inference_weight_and_bias()]
            [torch.Size([2, 1, 1, 1]), torch.Size([2])]
        """
        gamma, beta = self._gamma_beta()
        bn = self.bn
        # A copy: a later unfrozen forward may update running_var in place before this backward runs.
        var = _copy_running_stat(bn.running_var) if torch.is_grad_enabled() else bn.running_var
        weight = self._fake_quant_folded(gamma, var)
        bias = fold_bias(self.conv.bias, beta, bn.running_mean, gamma, var, bn.eps)
        return weight, bias.to(weight.dtype)

    def _folded_inference(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv._conv_forward(x, *self.inference_weight_and_bias())

    def _folded_training(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        gamma, _ = self._gamma_beta()
        # The copy is needed: bn() below updates running_var in place, and the op saves var for backward.
        var = _copy_running_stat(bn.running_var)
        spec = self.weight_spec
        weight = conv.weight
        # conv(x, q(w f)) / f per output channel equals conv(x, q(w f) / f) up to fp32 rounding; the fused op divides
        # the weight (divide_by_fold), whose backward recomputes q(w f) from the weight it reads anyway, instead of
        # a few passes over the conv output and small ops with their autograd (faster on ResNet-50:
        # docs/benchmarks.md, Numbers once quoted in code comments).
        with torch.no_grad():
            scale, zero_point = self._update_qparams(reference.bn_fold_training_factor(gamma, var, bn.eps))
        weight = bn_fold_fake_quant_weight(
            weight, gamma, var, bn.eps, scale, zero_point, spec.quant_min, spec.quant_max, divide_by_fold=True
        )
        return bn(conv._conv_forward(x, weight, conv.bias))

    def _float_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.training and self._frozen:
            bn = self.bn
            gamma, beta = (bn.weight, bn.bias) if bn.affine else (None, None)
            return F.batch_norm(y, bn.running_mean, bn.running_var, gamma, beta, False, 0.0, bn.eps)
        return self.bn(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fake_quant_on:
            return self._float_forward(x)
        if self.training and not self._frozen:
            return self._folded_training(x)
        return self._folded_inference(x)

    # -- export ----------------------------------------------------------------------------------

    @torch.no_grad()
    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float folded weight ``w * f`` and bias ``beta + (b - mean) * f`` from the running statistics.

        Example:
            >>> fused = ConvBnQAT(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
            >>> [t.shape for t in fused.folded_weight_and_bias()]
            [torch.Size([2, 1, 1, 1]), torch.Size([2])]
        """
        gamma, beta = self._gamma_beta()
        bn = self.bn
        factor = reference.bn_fold_factor(gamma, bn.running_var, bn.eps)
        shape = [-1] + [1] * (self.conv.weight.dim() - 1)
        weight = (self.conv.weight.float() * factor.reshape(shape)).to(self.conv.weight.dtype)
        bias = fold_bias(self.conv.bias, beta, bn.running_mean, gamma, bn.running_var, bn.eps)
        return weight, bias

    @torch.no_grad()
    def calibration(self) -> dict[str, Any]:
        """Bits, scale and zero point of the folded weight (from the current weight and running statistics).

        Example:
            >>> fused = ConvBnQAT(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
            >>> sorted(fused.calibration())
            ['bits', 'granularity', 'quant_max', 'quant_min', 'scale', 'zero_point']
        """
        gamma, _ = self._gamma_beta()
        scale, zero_point = self._update_qparams(reference.bn_fold_factor(gamma, self.bn.running_var, self.bn.eps))
        spec = self.weight_spec
        return {
            "bits": spec.bits,
            "quant_min": spec.quant_min,
            "quant_max": spec.quant_max,
            "granularity": "per_channel" if self.per_channel else "per_tensor",
            # per tensor: 0-d, as the quantizers report per-tensor scales
            "scale": scale.clone() if self.per_channel else scale[0].clone(),
            "zero_point": zero_point.clone() if self.per_channel else zero_point[0].clone(),
        }

    def extra_repr(self) -> str:
        return (
            f"bits={self.weight_spec.bits}, per_channel={self.per_channel}, "
            f"fake_quant={self._fake_quant_on}, bn_frozen={self._frozen}"
        )


# ---------------------------------------------------------------------------------------------
# Swapping modules in and out
# ---------------------------------------------------------------------------------------------


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, child = _split(name)
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_conv_bn(
    model: nn.Module,
    pairs: Iterable[Sequence[str]],
    weight_spec: QuantSpec | dict[str, QuantSpec] | None = None,
    quant_start_step: int | dict[str, int] = 0,
    freeze_bn_step: int | None = None,
) -> dict[str, ConvBnQAT]:
    """Replaces each conv of ``pairs`` by a :class:`ConvBnQAT` and its BN by ``nn.Identity``, in place.

    Args:
        model: the model holding the pairs.
        pairs: ``(conv_name, bn_name)`` qualified names, e.g. from :func:`find_conv_bn_pairs`.
        weight_spec: one spec for all, or a dict from conv name to spec (default 8-bit per channel).
        quant_start_step: one step for all, or a dict from conv name to step.
        freeze_bn_step: step from which BN statistics freeze (None: never).

    Returns:
        ``{conv_name: ConvBnQAT}``.

    Raises:
        ValueError: a name is not a module of ``model``, a module is used in two pairs, or the pair cannot be
            folded.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> list(fold_conv_bn(net, [("0", "1")]))
        ['0']
        >>> type(net[1]).__name__
        'Identity'
    """
    modules = dict(model.named_modules())
    pairs = [tuple(pair) for pair in pairs]
    seen: set[str] = set()
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(name, str) for name in pair):
            raise ValueError(f"fold_conv_bn: a pair must be (conv_name, bn_name), got {pair!r}")
        for name in pair:
            if name not in modules or name == "":
                raise ValueError(f"fold_conv_bn: {name!r} is not a submodule of {type(model).__name__}")
            if name in seen:
                raise ValueError(f"fold_conv_bn: module {name!r} appears in more than one pair")
            seen.add(name)
    fused: dict[str, ConvBnQAT] = {}
    for conv_name, bn_name in pairs:
        spec = weight_spec.get(conv_name) if isinstance(weight_spec, dict) else weight_spec
        start = quant_start_step.get(conv_name, 0) if isinstance(quant_start_step, dict) else quant_start_step
        module = ConvBnQAT(modules[conv_name], modules[bn_name], spec, start, freeze_bn_step)
        module.bn_name = bn_name  # where unfold_conv_bn puts the BN back
        module.train(modules[conv_name].training)
        _set_submodule(model, conv_name, module)
        _set_submodule(model, bn_name, nn.Identity())
        fused[conv_name] = module
    return fused


def conv_bn_modules(model: nn.Module) -> dict[str, ConvBnQAT]:
    """The :class:`ConvBnQAT` modules of ``model`` by qualified name.

    Example:
        >>> conv_bn_modules(nn.Sequential(nn.Conv2d(1, 1, 1)))
        {}
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, ConvBnQAT)}


def unfold_conv_bn(model: nn.Module) -> list[tuple[str, str]]:
    """Puts back the original conv and BN of every :class:`ConvBnQAT` made by :func:`fold_conv_bn`.

    Returns:
        The ``(conv_name, bn_name)`` pairs restored.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> _ = fold_conv_bn(net, [("0", "1")])
        >>> unfold_conv_bn(net)
        [('0', '1')]
        >>> type(net[1]).__name__
        'BatchNorm2d'
    """
    restored = []
    for conv_name, module in list(conv_bn_modules(model).items()):
        bn_name = getattr(module, "bn_name", None)
        if bn_name is None:
            raise ValueError(
                f"unfold_conv_bn: {conv_name!r} was not made by fold_conv_bn, so the BN's place is unknown"
            )
        _set_submodule(model, conv_name, module.conv)
        _set_submodule(model, bn_name, module.bn)
        restored.append((conv_name, bn_name))
    return restored

