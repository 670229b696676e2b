"""What the op tests share: exact comparisons, layouts, ties, quantization ranges and parameters.

Inputs are built on the CPU from seeded generators (the same values on every device) and then moved to the
test's device with :func:`on`.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from fakequant.qparams import quant_range

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

RANGES = [quant_range(b) for b in (1, 2, 4, 8, 16)]
RANGES += [quant_range(b, signed=False) for b in (1, 3, 8, 16)]
RANGES += [quant_range(b, narrow_range=True) for b in (2, 8)]

SPECIAL = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 1e-40])
NONFINITE = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e30, -1e30, 1e-30, -1e-30, 3.4e38]


def on(device: str, *values):
    """``values`` with every CPU tensor moved to ``device`` (meta tensors and non-tensors unchanged)."""
    moved = tuple(v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v for v in values)
    return moved


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality: same dtype, shape, device, values and NaN positions."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.device == expected.device, (actual.device, expected.device)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def assert_outputs_like_reference(
    out: torch.Tensor, mask: torch.Tensor, ref_out: torch.Tensor, ref_mask: torch.Tensor, compute_mask: bool, name: str
) -> None:
    """An element-wise op's ``(out, mask)`` against the reference kernel's: the same bits, ``out`` in the reference's
    strides, the mask in ``out``'s (or empty without ``compute_mask``)."""
    assert_identical(out, ref_out)
    assert_identical(mask, ref_mask)
    assert out.stride() == ref_out.stride(), name
    if compute_mask:
        assert mask.stride() == out.stride(), name
    else:
        assert mask.numel() == 0


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape, device, NaN positions and bits everywhere else (so -0.0 differs from +0.0)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.device == expected.device, (actual.device, expected.device)
    if actual.dtype == torch.bool or not actual.is_floating_point():
        assert torch.equal(actual, expected)
        return
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN positions differ"
    a, e = actual[~nan], expected[~nan]
    mismatch = a.view(_INT_VIEW[a.dtype]) != e.view(_INT_VIEW[e.dtype])
    assert not bool(mismatch.any()), f"{int(mismatch.sum())} values differ, e.g. {a[mismatch][:4]} vs {e[mismatch][:4]}"


def assert_layout_of(output: torch.Tensor, x: torch.Tensor) -> None:
    """``output`` has the layout the fake impls give: that of ``torch.empty_like(x)``."""
    template = torch.empty_like(x)
    for size, got, want in zip(output.shape, output.stride(), template.stride(), strict=True):
        if size != 1:
            assert got == want, (output.stride(), template.stride())


def assert_statistic_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Per-channel sums: the kernels sum in another order than torch, so close, not equal."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values (x is 4-D) as contiguous, channels_last, transposed and sliced (non-dense)."""
    wide = torch.cat([x, x], dim=3)
    return {
        "contiguous": x.contiguous(),
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed": x.transpose(0, 2).contiguous().transpose(0, 2),
        "sliced": wide[..., ::2],
    }


def any_layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``x`` of any rank (values unchanged) in several memory layouts."""
    out = {"contiguous": x.contiguous()}
    if x.dim() == 0:
        return out
    padded = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
    if x.dtype == torch.bool:
        padded = padded.bool()
    padded[..., ::2] = x
    out["strided"] = padded[..., ::2]
    if x.dim() >= 2:
        out["transposed"] = x.transpose(0, -1).contiguous().transpose(0, -1)
    if x.dim() == 4:
        out["channels_last"] = x.contiguous(memory_format=torch.channels_last)
    return out


def kernel_layouts(x: torch.Tensor):
    """x's values in x's shape, laid out as: contiguous, channels_last (4-D), dense with the first and last
    dimensions' strides swapped, strided (not dense), and off the 16-byte vector alignment (the scalar path)."""
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    if x.dim() >= 2:
        yield "permuted dense", x.transpose(0, -1).contiguous().transpose(0, -1)
        yield "strided", torch.cat([x, x], dim=-1)[..., ::2]
    yield "offset by one element", torch.cat([x.new_zeros(1), x.flatten()])[1:].view(x.shape)


def ties(scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """Inputs (k + 0.5) * scale around and beyond the range, plus their fp32 neighbours."""
    k = torch.arange(quant_min - zero_point - 3, quant_max - zero_point + 3, dtype=torch.float32)
    x = (k + 0.5) * scale
    return torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1), k * scale])


def symmetric_ties(scale: float, count: int = 40) -> torch.Tensor:
    """``(k + 0.5) * scale`` for k in [-count, count)."""
    return (torch.arange(-count, count, dtype=torch.float32) + 0.5) * scale


def special_values(shape, scale: float, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    """Random values over and beyond the range, exact ties (k + 0.5) * scale, zeros, NaN and +-inf."""
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for size in shape:
        numel *= size
    values = torch.randn(numel, generator=generator) * 200 * scale
    tie_values = (torch.randint(-300, 300, (numel,), generator=generator).float() + 0.5) * scale
    values = torch.where(torch.rand(numel, generator=generator) < 0.3, tie_values, values)
    nan, inf = float("nan"), float("inf")
    specials = torch.tensor([0.0, -0.0, nan, inf, -inf, 0.5 * scale, -0.5 * scale, 1.0, -1.0])
    values[: min(numel, len(specials))] = specials[: min(numel, len(specials))]
    perm = torch.randperm(numel, generator=generator)
    return values[perm].reshape(shape).to(dtype).to(device)


def qparams_per_tensor(scale: float, zero_point: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(scale, dtype=torch.float32, device=device),
            torch.tensor(zero_point, dtype=torch.int32, device=device))  # fmt: skip


def qparams(scale, zero_point, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale(s) and int32 zero point(s) from numbers or lists."""
    return (torch.as_tensor(scale, dtype=torch.float32, device=device),
            torch.as_tensor(zero_point, dtype=torch.int32, device=device))  # fmt: skip


def qparams_per_channel(channels: int, quant_min: int, quant_max: int, generator: torch.Generator,
                        device: str = "cpu"):  # fmt: skip
    scale = torch.rand(channels, generator=generator) * 0.2 + 0.01
    zero_point = torch.randint(quant_min, quant_max + 1, (channels,), generator=generator, dtype=torch.int32)
    return scale.to(device), zero_point.to(device)


def seeded_qparams(channels=None, zp_dtype=torch.int32, quant_min=-128, quant_max=127, device="cpu"):
    """Scale 0.0371 and zero point 3 per tensor, or seeded random ones per channel."""
    generator = torch.Generator().manual_seed(1)
    if channels is None:
        return torch.tensor(0.0371, device=device), torch.tensor(3, dtype=zp_dtype, device=device)
    scale = (torch.rand(channels, generator=generator) * 0.1 + 0.01).to(device)
    zero_point = torch.randint(quant_min, quant_max + 1, (channels,), generator=generator).to(zp_dtype).to(device)
    return scale, zero_point


def bn_case(shape, gen, dtype=torch.float32, stat_dtype=torch.float32, device="cpu"):
    """A BN-folded weight's ``(weight, gamma, var, eps, scale, zero_point)``: var 0 in channel 0, scales that
    saturate a few levels."""
    channels = shape[0]
    weight = torch.randn(shape, generator=gen) * 0.3
    gamma = torch.rand(channels, generator=gen) + 0.5
    var = torch.rand(channels, generator=gen) * 2
    var[0] = 0.0  # eps alone keeps it finite
    eps = 1e-5
    folded_max = (weight.abs().reshape(channels, -1).amax(dim=1) * gamma / torch.sqrt(var + eps)).clamp_min(1e-3)
    scale = folded_max / 100  # saturates a few of the [-128, 127] levels' neighbours
    zero_point = torch.randint(-2, 3, (channels,), generator=gen, dtype=torch.int32)
    return (
        weight.to(dtype=dtype, device=device),
        gamma.to(dtype=stat_dtype, device=device),
        var.to(dtype=stat_dtype, device=device),
        eps,
        scale.to(device),
        zero_point.to(device),
    )


def grads(fn, inputs):
    """``fn``'s output and the gradients of ``inputs`` (fresh leaves) under fixed weights."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape).to(out.dtype)
    (out.float() * weights.float()).sum().backward()
    return out, [t.grad for t in inputs]


def large(device: str) -> int:
    """An odd element count past several kernel blocks: a million on a GPU, a few thousand on the CPU (where the
    Triton interpreter costs milliseconds per block; tests/backends/test_cpu_kernels.py covers long C++ runs)."""
    return 1000003 if device.startswith("cuda") else 5003


# The message of a scale the ops reject (docs/numerics.md, Argument checks), as a regular expression.
SCALE_MESSAGE = r"scale must be finite and >= 2\^-126 \(the smallest normal float32; 1 / scale overflows below it\)"
_VALUE_CHECK = re.compile(r"scale must be finite and >= 2\^-126|zero_point -?\d+ is outside")


def reference_error(fn, *args) -> str:
    """The ValueError message of the reference ``fn`` for ``args`` (CPU tensors)."""
    with pytest.raises(ValueError) as info:
        fn(*args)
    return str(info.value)


def assert_same_error(op, reference_fn, args: tuple, device: str) -> None:
    """``op`` on ``device`` raises the reference's ValueError word for word; a value check (of a scale or zero point)
    is made on CPU tensors only, so on another device the call must pass it (docs/numerics.md, Argument checks)."""
    message = reference_error(reference_fn, *args)
    assert message.startswith("fakequant: ")
    args = on(device, *args)
    message = message.replace(" on cpu", f" on {args[0].device}")
    if device != "cpu" and _VALUE_CHECK.search(message):
        op(*args)
        return
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        op(*args)


def torchao_mx_formats():
    """torchao's ``prototype.mx_formats`` (the outside reference of the MX and NVFP4 ops): a test requirement
    (requirements-dev.txt), so on CI its absence is a failure; elsewhere (the GPU kit's machine installs nothing)
    the comparison is skipped with the reason."""
    try:
        import torchao.prototype.mx_formats as mx_formats
        from torchao.prototype.mx_formats import mx_tensor, nvfp4_tensor  # noqa: F401
    except ImportError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"torchao is not installed ({error}); pip install -r requirements-dev.txt")
    return mx_formats
