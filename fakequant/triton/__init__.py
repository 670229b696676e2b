"""Triton kernels of the ``fakequant::`` ops, one module per op family (mirroring ``csrc/cuda/*.cu``).

Each op is laid out the same way: a ``_<op>_kernel`` (``@triton.jit``) and a host function ``<op>_triton`` that
checks the arguments (:mod:`fakequant.checks`, so the errors read the same), prepares dense inputs and launches
the kernel; ``@triton_kernel("<op>")`` registers it as ``fakequant::_triton_<op>`` (what ``torch.compile`` traces
into) and as the ``"triton"`` backend's kernel of ``fakequant::<op>`` (:func:`fakequant.set_backend`).

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels also run on CPU tensors.

Example (on a GPU; on CPU tensors under ``TRITON_INTERPRET=1`` the same without ``device="cuda"``):
    >>> import torch, fakequant
    >>> fakequant.set_backend("triton")  # doctest: +SKIP
    >>> x = torch.tensor([0.04, 0.06, 1.0], device="cuda")  # doctest: +SKIP
    >>> torch.ops.fakequant._triton_fake_quant_per_tensor(
    ...     x, torch.tensor(0.1, device="cuda"), torch.tensor(0, device="cuda"), -8, 7)  # doctest: +SKIP
    (tensor([0.0000, 0.1000, 0.7000], device='cuda:0'), tensor([True, True, False], device='cuda:0'))
"""

from fakequant.triton import bn_fold, fake_quant, float_formats, learnable, observe  # noqa: F401  (registers kernels)
from fakequant.triton._common import INTERPRETED

__all__ = ["INTERPRETED"]
