"""Per-tensor fake quantization of 2^22 fp32 elements on CPU (2 threads, see conftest.py).

Providers: a plain copy (the memory-bandwidth floor), the fused C++ kernel with and without the mask, the
pure-PyTorch composition (fakequant.reference), torch.fake_quantize_per_tensor_affine, and torch.compile of
the composition; forward and forward+backward. GB/s counts the bytes each mode must move at least:
forward 8 B/element without the mask, 9 with it; forward+backward 18 (x, out, mask; grad, mask, grad_x).

    python -m pytest bench/bench_fake_quant_per_tensor.py --benchmark-only

Issue 2's targets (same run): forward without the mask within 1.1x of the copy, with the mask within
1.25x, both faster than the compiled composition; forward+backward within 3x of the copy.
"""

from __future__ import annotations

import pytest
import torch

import fakequant
from fakequant import reference

N = 1 << 22
QUANT_MIN, QUANT_MAX = -128, 127
FORWARD_BYTES = {False: 8 * N, True: 9 * N}
BACKWARD_BYTES = 18 * N

pytestmark = pytest.mark.benchmark(min_rounds=10, max_time=0.5, warmup=True, warmup_iterations=3)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, generator=g) * 3
    grad_out = torch.randn(N, generator=g)
    scale = torch.tensor(0.05)
    zero_point = torch.tensor(3, dtype=torch.int32)
    return x, grad_out, scale, zero_point


def test_extension_loaded():
    assert fakequant.extension_loaded(), fakequant.extension_error()


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


def test_forward_copy(benchmark, record, data):
    x = data[0]
    y = torch.empty_like(x)
    benchmark(torch.add, x, 0, out=y)
    record(benchmark, "forward", "copy", FORWARD_BYTES[False])


def test_forward_copy_allocating(benchmark, record, data):
    # The fused op allocates its output (and mask) on every call, as any functional op does; a copy into a
    # fresh tensor shows what that allocation (page faults included) costs on its own.
    benchmark(torch.add, data[0], 0)
    record(benchmark, "forward", "copy (allocating)", FORWARD_BYTES[False])


@pytest.mark.parametrize("compute_mask", [False, True], ids=["no_mask", "mask"])
def test_forward_fused(benchmark, record, data, compute_mask):
    x, _, scale, zero_point = data
    op = torch.ops.fakequant.fake_quant_per_tensor
    benchmark(op, x, scale, zero_point, QUANT_MIN, QUANT_MAX, compute_mask)
    record(benchmark, "forward", f"fused ({'mask' if compute_mask else 'no mask'})", FORWARD_BYTES[compute_mask])


def test_forward_reference(benchmark, record, data):
    x, _, scale, zero_point = data
    benchmark(reference.fake_quant_per_tensor_forward, x, scale, zero_point, QUANT_MIN, QUANT_MAX, True)
    record(benchmark, "forward", "reference composition", FORWARD_BYTES[True])


def test_forward_torch(benchmark, record, data):
    x, _, scale, zero_point = data
    benchmark(torch.fake_quantize_per_tensor_affine, x, scale, zero_point, QUANT_MIN, QUANT_MAX)
    record(benchmark, "forward", "torch.fake_quantize", FORWARD_BYTES[False])


@pytest.mark.parametrize("compute_mask", [False, True], ids=["no_mask", "mask"])
def test_forward_compiled_reference(benchmark, record, data, compute_mask):
    x, _, scale, zero_point = data
    # Not fullgraph: the reference's value checks (scale > 0, zero point in range) read tensor values, a graph
    # break; the arithmetic after them compiles into one graph.
    compiled = torch.compile(reference.fake_quant_per_tensor_forward)
    compiled(x, scale, zero_point, QUANT_MIN, QUANT_MAX, compute_mask)  # compile outside the timing
    benchmark(compiled, x, scale, zero_point, QUANT_MIN, QUANT_MAX, compute_mask)
    name = f"compiled composition ({'mask' if compute_mask else 'no mask'})"
    record(benchmark, "forward", name, FORWARD_BYTES[compute_mask])


# ---------------------------------------------------------------------------------------------
# Forward + backward: out = f(x); grad_x = d out / d x . grad_out
# ---------------------------------------------------------------------------------------------


def forward_backward(fn, x, grad_out):
    out = fn(x)
    return torch.autograd.grad(out, x, grad_out)[0]


def run_forward_backward(benchmark, record, data, provider, fn):
    x, grad_out = data[0].clone().requires_grad_(), data[1]
    forward_backward(fn, x, grad_out)  # warm-up (and compilation)
    benchmark(forward_backward, fn, x, grad_out)
    record(benchmark, "forward+backward", provider, BACKWARD_BYTES)


def test_forward_backward_fused(benchmark, record, data):
    _, _, scale, zero_point = data
    run_forward_backward(
        benchmark,
        record,
        data,
        "fused",
        lambda x: fakequant.fake_quant_per_tensor(x, scale, zero_point, QUANT_MIN, QUANT_MAX),
    )


def test_forward_backward_reference(benchmark, record, data):
    _, _, scale, zero_point = data
    run_forward_backward(
        benchmark,
        record,
        data,
        "reference composition",
        lambda x: reference.fake_quant_per_tensor(x, scale, zero_point, QUANT_MIN, QUANT_MAX),
    )


def test_forward_backward_torch(benchmark, record, data):
    _, _, scale, zero_point = data
    run_forward_backward(
        benchmark,
        record,
        data,
        "torch.fake_quantize",
        lambda x: torch.fake_quantize_per_tensor_affine(x, scale, zero_point, QUANT_MIN, QUANT_MAX),
    )


def test_forward_backward_compiled_reference(benchmark, record, data):
    _, _, scale, zero_point = data

    def composition(x):
        return reference.fake_quant_per_tensor(x, scale, zero_point, QUANT_MIN, QUANT_MAX)

    run_forward_backward(benchmark, record, data, "compiled composition", torch.compile(composition))
