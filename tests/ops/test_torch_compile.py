"""A training step that calls every op, compiled with ``torch.compile(fullgraph=True)``, on every (device, backend)
pair whose kernels a compiled graph can call: Triton on CPU tensors is the interpreter, which it cannot."""

from __future__ import annotations

import pytest
import torch

import fakequant
from tests.conftest import device_backend_params
from tests.ops._helpers import assert_identical, qparams_per_channel, qparams_per_tensor


@pytest.mark.parametrize("device_backend", device_backend_params(exclude=(("cpu", "triton"),)), indirect=True)
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic, device):
    """The backward calls masked_grad and the BN fold's backward; the range observer updates its state in place.
    The compiled step matches eager mode."""

    def step(x, w, gamma, var, m, scale, zp, scale_c, zp_c, tracked, observed_scale, observed_zp):
        torch.ops.fakequant.observe_range(x.detach(), tracked, observed_scale, observed_zp, None, 0.01, -128, 127,
                                          False)  # fmt: skip
        a = fakequant.fake_quant_per_tensor(x, scale, zp, -128, 127)
        b = fakequant.binarize(a)
        c = fakequant.fake_quant_per_channel(w, scale_c, zp_c, 0, -8, 7)
        d = fakequant.bn_fold_fake_quant_weight(w, gamma, var, 1e-5, scale_c, zp_c, -8, 7)
        e = fakequant.bn_fold_fake_quant_weight(w, gamma, var, 1e-5, scale_c, zp_c, -8, 7, divide_by_fold=True)
        f = fakequant.fake_quant_fp8(w, None, "e4m3", 6) + fakequant.fake_quant_fp8(w, scale_c, "e5m2", 6)
        g = fakequant.fake_quant_mx(m, "e2m1") * fakequant.fake_quant_nvfp4(m)
        # The float-format terms are returned whole: Inductor sums them in another order than eager mode.
        return (a * b).sum() + (c * d * e).sum(), f, g

    def state():
        return [torch.tensor([-1.0, 1.0], device=device), torch.ones((), device=device),
                torch.zeros((), dtype=torch.int32, device=device)]  # fmt: skip

    g = torch.Generator().manual_seed(8)
    inputs = [torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, generator=g),
              torch.rand(5, generator=g) + 0.1, torch.randn(4, 32, generator=g), *qparams_per_tensor(0.05, 0),
              *qparams_per_channel(5, -8, 7, g)]  # fmt: skip
    inputs = [t.to(device) for t in inputs]
    differentiated = [inputs[i] for i in (0, 1, 2, 4)]
    for t in differentiated:
        t.requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    eager_state, compiled_state = state(), state()
    eager_loss, *eager_terms = step(*inputs, *eager_state)
    eager_grads = torch.autograd.grad(eager_loss + sum(t.sum() for t in eager_terms), differentiated)
    compiled_loss, *compiled_terms = compiled(*inputs, *compiled_state)
    compiled_grads = torch.autograd.grad(compiled_loss + sum(t.sum() for t in compiled_terms), differentiated)
    assert_identical(compiled_loss, eager_loss)
    for a, b in zip(compiled_terms, eager_terms, strict=True):
        assert_identical(a, b)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(compiled_state, eager_state, strict=True):
        assert_identical(a, b)
    assert float(eager_state[0][0]) < -1.0 or float(eager_state[1]) != 1.0  # the observer did update the state
