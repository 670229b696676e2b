"""NNI-style quantizers on the fakequant ops: Naive, QAT, DoReFa, BNN and LSQ (docs/numerics.md, Algorithms).

``__all__`` is the registry of the quantizer algorithms: :func:`fakequant.quantizers.base.quantizer_classes` reads
it, and the messages that name the quantizers with an ONNX export are generated from it.
"""

from fakequant.quantizers.base import QuantizedLayer, Quantizer
from fakequant.quantizers.bnn import BNNQuantizer
from fakequant.quantizers.dorefa import DoReFaQuantizer
from fakequant.quantizers.lsq import LsqQuantizer
from fakequant.quantizers.naive import NaiveQuantizer
from fakequant.quantizers.qat import QAT_Quantizer, QATQuantizer

__all__ = [
    "BNNQuantizer",
    "DoReFaQuantizer",
    "LsqQuantizer",
    "NaiveQuantizer",
    "QAT_Quantizer",
    "QATQuantizer",
    "QuantizedLayer",
    "Quantizer",
]
