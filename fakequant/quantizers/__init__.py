"""NNI-style quantizers on the fakequant ops: Naive, QAT, DoReFa and BNN (SPEC §3)."""

from fakequant.quantizers.base import QuantizedLayer, Quantizer
from fakequant.quantizers.bnn import BNNQuantizer
from fakequant.quantizers.dorefa import DoReFaQuantizer
from fakequant.quantizers.naive import NaiveQuantizer
from fakequant.quantizers.qat import QAT_Quantizer, QATQuantizer

__all__ = [
    "BNNQuantizer",
    "DoReFaQuantizer",
    "NaiveQuantizer",
    "QAT_Quantizer",
    "QATQuantizer",
    "QuantizedLayer",
    "Quantizer",
]
