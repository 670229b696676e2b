"""fakequant: fused fake-quantization kernels and NNI-style quantizers for quantization-aware training."""

from fakequant import (
    _backend,
    _ops,  # noqa: F401  (defines the fakequant:: op schemas before _C registers kernels)
)
from fakequant._backend import available_backends, extension_error, extension_loaded, get_backend, set_backend
from fakequant.calibration import calibrate
from fakequant.functional import (
    binarize,
    bn_fold_fake_quant_weight,
    fake_quant_learnable,
    fake_quant_per_channel,
    fake_quant_per_group,
    fake_quant_per_tensor,
    fold_bias,
    lsq_grad_factor,
)
from fakequant.memory import retain_freed_memory
from fakequant.qparams import PerChannel, PerGroup, PerTensor, QuantSpec, choose_qparams, quant_range
from fakequant.quantizers import (
    BNNQuantizer,
    DoReFaQuantizer,
    LsqQuantizer,
    NaiveQuantizer,
    QAT_Quantizer,
    QATQuantizer,
    Quantizer,
)

_backend.init()

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "BNNQuantizer",
    "DoReFaQuantizer",
    "LsqQuantizer",
    "NaiveQuantizer",
    "QAT_Quantizer",
    "QATQuantizer",
    "Quantizer",
    "binarize",
    "bn_fold_fake_quant_weight",
    "calibrate",
    "choose_qparams",
    "extension_error",
    "extension_loaded",
    "fake_quant_learnable",
    "fake_quant_per_channel",
    "fake_quant_per_group",
    "fake_quant_per_tensor",
    "fold_bias",
    "get_backend",
    "lsq_grad_factor",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QuantSpec",
    "quant_range",
    "retain_freed_memory",
    "set_backend",
]
