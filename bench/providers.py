"""The benchmark providers and modes, in the order of every table, plot and run, with the providers' labels.

A provider is what computes an op (``bench/common.py`` describes each). Variants of one provider share its
place: ``fakequant-cuda`` and ``fakequant-triton`` sort with ``fakequant``, ``copy-alloc`` with ``copy``.
This module imports nothing heavy, so the reporting reads the order without importing torch.

Example:
    >>> sorted(["nni", "fakequant-cuda", "copy", "reference"], key=rank)
    ['copy', 'fakequant-cuda', 'reference', 'nni']
    >>> PROVIDERS["compile"]
    'torch.compile(reference)'
"""

from __future__ import annotations

# Table order, then the label a plot's legend gives each provider.
PROVIDERS = {
    "copy": "one copy of the tensor",
    "fakequant": "fakequant",
    "reference": "PyTorch ops (reference)",
    "torch": "torch.fake_quantize_*",
    "compile": "torch.compile(reference)",
    "nni": "NNI 3.0",
    "torchao": "torchao 0.18",
}
PROVIDER_ORDER = tuple(PROVIDERS)
MODE_ORDER = ("copy", "fwd", "fwd+mask", "fwd+bwd")


def rank(value: str, order: tuple[str, ...] = PROVIDER_ORDER) -> int:
    """The place of ``value`` in ``order`` (a provider's variant takes its base name's place; unknown: last).

    Example:
        >>> rank("fakequant-triton"), rank("fwd+bwd", MODE_ORDER), rank("someone-else")
        (1, 3, 6)
    """
    key = value.split("-")[0] if value not in order else value
    return order.index(key) if key in order else len(order)
