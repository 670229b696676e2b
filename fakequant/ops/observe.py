"""Range observation: the tracked range, scale and zero point updated in place in one op (docs/numerics.md,
Range observation; Choosing scale and zero point). One call instead of the small tensor ops a quantizer would
otherwise spend per layer and step on its ranges.
"""

from __future__ import annotations

from fakequant import checks, reference
from fakequant.ops._library import define, reference_kernel, register_fake

# Updates the tracked [min, max] with x's range (replaced when averaging_constant == 1, else moved towards it) and
# sets scale/zero_point from it, all in place. fold observes x * fold along axis 0 (a BN-folded weight), relu
# observes relu(x).
define(
    "observe_range",
    "(Tensor x, Tensor(a!) tracked_range, Tensor(b!) scale, Tensor(c!) zero_point, int? axis, "
    "float averaging_constant, int quant_min, int quant_max, bool symmetric, Tensor? fold=None, "
    "bool relu=False) -> ()",
)


@reference_kernel("observe_range")
def observe_range_reference(
    x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, symmetric, fold=None,
    relu=False,
):
    reference.observe_range(
        x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, symmetric, fold, relu
    )


@register_fake("observe_range")
def _(
    x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, symmetric, fold=None,
    relu=False,
):
    checks.check_observe_range_args(
        x, tracked_range, scale, zero_point, axis, averaging_constant, quant_min, quant_max, fold
    )
