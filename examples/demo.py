"""Short demo: fake-quantize a tensor and a small model, fused kernels vs the pure-PyTorch reference."""

import time

import torch

import fakequant
from fakequant import reference


def median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1 << 22)
    scale, zero_point = fakequant.choose_qparams(x.min(), x.max(), -128, 127, symmetric=False)
    print(f"fakequant {fakequant.__version__}, compiled kernels loaded: {fakequant.extension_loaded()}")
    fused = median_ms(lambda: fakequant.fake_quant_per_tensor(x, scale, zero_point, -128, 127))
    composed = median_ms(lambda: reference.fake_quant_per_tensor_forward(x, scale, zero_point, -128, 127))
    same = torch.equal(
        fakequant.fake_quant_per_tensor(x, scale, zero_point, -128, 127),
        reference.fake_quant_per_tensor_forward(x, scale, zero_point, -128, 127)[0],
    )
    print(f"per-tensor fake quant of 2^22 fp32: fused {fused:.2f} ms, reference {composed:.2f} ms, identical: {same}")


if __name__ == "__main__":
    main()
