"""fakequant: fused fake-quantization kernels and NNI-style quantizers for quantization-aware training."""

from fakequant import (
    _backend,
    ops,  # noqa: F401  (defines the fakequant:: ops before _C registers kernels)
)
from fakequant._backend import available_backends, extension_error, extension_loaded, get_backend, set_backend
from fakequant.calibration import calibrate
from fakequant.memory import retain_freed_memory
from fakequant.ops.binary import *  # noqa: F403
from fakequant.ops.bn_fold import *  # noqa: F403
from fakequant.ops.fake_quant import *  # noqa: F403
from fakequant.ops.float_formats import *  # noqa: F403
from fakequant.ops.learnable import *  # noqa: F403
from fakequant.qparams import (
    FloatSpec,
    FormatSpec,
    Granularity,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
    choose_qparams,
    quant_range,
)
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
    "calibrate",
    "choose_qparams",
    "extension_error",
    "extension_loaded",
    "FloatSpec",
    "FormatSpec",
    "get_backend",
    "Granularity",
    "PerBlock",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QuantSpec",
    "quant_range",
    "retain_freed_memory",
    "set_backend",
]
# The public op functions: each family module's __all__ (a new op in a family is exported there).
__all__ += (
    ops.binary.__all__
    + ops.bn_fold.__all__
    + ops.fake_quant.__all__
    + ops.float_formats.__all__
    + ops.learnable.__all__
)
