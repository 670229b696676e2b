"""The ``fakequant::`` custom ops, one module per op family (mirroring ``csrc/ops`` and ``fakequant/triton``).

Each family module holds, op by op, the schema, the reference kernel, the fake impl, the Python autograd and the
public function (:mod:`fakequant.ops._library` describes the pattern). Importing this package defines every op;
the compiled extension ``fakequant._C`` adds its C++/CUDA kernels to them when it is loaded afterwards.

Example:
    >>> import torch, fakequant
    >>> torch.ops.fakequant.fake_quant_per_tensor(torch.tensor([0.26]), torch.tensor(0.1), torch.tensor(0), -8, 7)
    (tensor([0.3000]), tensor([True]))
"""

from fakequant.ops import binary, bn_fold, fake_quant, float_formats, learnable, observe  # noqa: F401  (defines the ops)
from fakequant.ops._library import (
    LIBRARY,
    composite_op_names,
    kernel,
    kernel_op_names,
    kernels,
    op_names,
    register_kernel,
    register_python_autograd,
)

__all__ = [
    "LIBRARY",
    "composite_op_names",
    "kernel",
    "kernel_op_names",
    "kernels",
    "op_names",
    "register_kernel",
    "register_python_autograd",
]
