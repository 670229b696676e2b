import torch

import fakequant


def test_per_tensor_matches_torch():
    x = torch.randn(1000) * 3
    scale, zero_point = torch.tensor(0.05), torch.tensor(3, dtype=torch.int32)
    out = fakequant.fake_quant_per_tensor(x, scale, zero_point, -128, 127)
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127))
