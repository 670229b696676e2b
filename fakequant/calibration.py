"""Post-training calibration: activation ranges observed on data, no training, then export or QAT.

:func:`calibrate` quantizes a trained model with :class:`fakequant.QAT_Quantizer`, runs batches through it in
eval mode (BatchNorm statistics and weights untouched) while temporary hooks record the range of every
quantized input and output, and sets each tensor's tracked range, scale and zero point from them. Weight ranges
need no data: the quantizer takes them from the weights on every forward. The result is the quantizer, in eval
mode, ready for ``export_model`` (ONNX Q/DQ included) or for quantization-aware training that starts from the
calibrated ranges (its EMA moves on from them instead of from the first training batch).

Observers:

* ``"minmax"`` (the default): the smallest and largest value seen over all batches. Nothing is clipped, which is
  what 8-bit activations want: 256 levels leave a step small enough that an outlier costs little resolution,
  and it is what QAT itself starts from.
* ``"percentile"``: per batch, the ``percentile``-th and ``(100 - percentile)``-th percentiles (of at most
  2^20 values sampled evenly from the batch), averaged over the batches. It clips rare outliers for a finer
  step over the bulk of the values, which matters at 4 to 6 bits and for heavy-tailed activations.

Float formats (``quant_dtype`` of :class:`fakequant.FloatSpec`): an FP8 per-tensor activation scale and NVFP4's
per-tensor scale come from the recorded range, ``max(-min, max)`` being the absolute maximum they are computed from;
MX and FP8-block activations compute their scales from each block in the op and have nothing to calibrate.

MSE-optimal ranges (a search per tensor) were left out: they cost a search per tensor and batch, and on 8-bit
activations they land within a step of the min/max range.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fakequant.quantizers.ema_range import tracks_activation_range
from fakequant.quantizers.qat import QAT_Quantizer

__all__ = ["calibrate", "OBSERVERS"]

OBSERVERS = ("minmax", "percentile")
# Values per batch that torch.quantile sees (it sorts them); larger tensors are sampled evenly.
_QUANTILE_SAMPLE = 1 << 20


class _RangeRecorder:
    """The observed range of one tensor over the calibration batches."""

    def __init__(self, observer: str, percentile: float) -> None:
        self.observer, self.percentile = observer, percentile
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None
        self.batches = 0

    def record(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        if self.observer == "minmax":
            low, high = x.min(), x.max()
            self.low = low if self.low is None else torch.minimum(self.low, low)
            self.high = high if self.high is None else torch.maximum(self.high, high)
        else:
            if x.numel() > _QUANTILE_SAMPLE:
                x = x[:: -(-x.numel() // _QUANTILE_SAMPLE)]
            q = torch.quantile(x, torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=x.device))
            self.low = q[0] if self.low is None else self.low + q[0]
            self.high = q[1] if self.high is None else self.high + q[1]
        self.batches += 1

    def range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.low is None:
            return None
        if self.observer == "percentile":
            return self.low / self.batches, self.high / self.batches
        return self.low, self.high


def _batches(data: Iterable, num_batches: int | None):
    for index, batch in enumerate(data):
        if num_batches is not None and index >= num_batches:
            return
        yield batch


def calibrate(
    model: nn.Module,
    config_list: list[dict],
    data: Iterable[Any],
    num_batches: int | None = None,
    observer: str = "minmax",
    percentile: float = 99.99,
    optimizer: torch.optim.Optimizer | None = None,
    bn_folding: bool = True,
) -> QAT_Quantizer:
    """Post-training quantization: observes activation ranges on ``data`` and returns the calibrated quantizer.

    Args:
        model: a trained float model (quantized in place, as ``QAT_Quantizer.compress`` does).
        config_list: NNI's config_list, as for :class:`fakequant.QAT_Quantizer`.
        data: batches: tensors, or tuples/lists whose first element is the model's input (``(images, labels)``).
        num_batches: use at most this many batches (default: all of ``data``).
        observer: ``"minmax"`` or ``"percentile"`` (see the module docstring for which to use when).
        percentile: for ``"percentile"``, the upper percentile kept (the lower one is ``100 - percentile``).
        optimizer: passed to the quantizer, for quantization-aware training after the calibration.
        bn_folding: fold Conv+BN pairs (the inference form, and QAT's default).

    Returns:
        The quantizer, compressed and calibrated, with the model in eval mode: call ``export_model`` to write the
        calibrated model (and its ONNX Q/DQ form), or train the model to continue with QAT from these ranges.

    Raises:
        ValueError: an unknown observer, a percentile outside (50, 100], no batch in ``data``, or a bad config.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [torch.randn(16, 4) for _ in range(4)]
        >>> quantizer = calibrate(model, [{'quant_types': ['weight', 'input'], 'op_types': ['Linear']}], data)
        >>> sorted(quantizer.calibration())
        ['0', '2']
    """
    if observer not in OBSERVERS:
        raise ValueError(f"calibrate: observer={observer!r}; allowed: {', '.join(OBSERVERS)}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"calibrate: percentile={percentile!r}; allowed: a number in (50, 100]")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"calibrate: num_batches={num_batches!r}; allowed: None or an int >= 1")
    quantizer = QAT_Quantizer(model, config_list, optimizer, bn_folding=bn_folding)
    model = quantizer.compress()
    recorders: dict[tuple[str, str], _RangeRecorder] = {}
    handles = []
    for name, layer in quantizer.layers.items():
        for quant_type in layer.config.quant_types:
            if quant_type == "weight" or not tracks_activation_range(layer.config.specs[quant_type]):
                continue  # weights, and float formats with per-block scales only: computed on every forward
            recorder = recorders[(name, quant_type)] = _RangeRecorder(observer, percentile)
            if quant_type == "input":
                handles.append(layer.module.register_forward_pre_hook(
                    lambda module, args, recorder=recorder: recorder.record(args[0])))  # fmt: skip
            else:
                handles.append(layer.module.register_forward_hook(
                    lambda module, args, output, recorder=recorder: recorder.record(output)))  # fmt: skip
    model.eval()  # ranges not yet observed: the quantized activations run in float while they are recorded
    seen = 0
    try:
        with torch.no_grad():
            for batch in _batches(data, num_batches):
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ValueError("calibrate: data yielded no batch; allowed: an iterable of at least one batch")
    for (name, quant_type), recorder in recorders.items():
        observed = recorder.range()
        if observed is None:
            continue  # the tensor never appeared in a forward pass: it stays float, as QAT leaves it
        quantizer.set_activation_range(quantizer.layers[name], quant_type, *observed)
    return quantizer
