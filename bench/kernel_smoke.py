"""Every ``fakequant::`` op once on tiny tensors, on one device and backend, against the reference.

The GPU check runs this under ``compute-sanitizer --tool memcheck``: a short run that reaches every CUDA kernel
(each op, each dtype, per tensor and per channel along a leading, a middle and the last axis, contiguous,
channels_last and sliced inputs, an empty tensor, an odd element count), so that an out-of-bounds access or a
misaligned vector load shows up as a sanitizer error. Each result is also compared with the reference kernel on
CPU copies of the same inputs: bit for bit, except the per-channel sums of the BN fold's and the learnable op's
backward (the order of a sum differs between kernels; relative 1e-5).

    python bench/kernel_smoke.py --device cuda --backend cuda
    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/kernel_smoke.py --device cuda --backend cuda
    python bench/kernel_smoke.py --device cpu --backend auto      # the C++ kernels (what the tests run)

Exit status 0 when every case matched, 1 otherwise (each mismatch printed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/kernel_smoke.py` puts bench/ first

import fakequant  # noqa: E402
from fakequant import _ops, reference  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# 4x3x5x7: an odd element count (420) with every dimension > 1; 1000003 (prime) covers a vector tail and
# more than one block of every kernel.
SHAPE = (4, 3, 5, 7)
LONG = (1000003,)


def special_values(shape, dtype, generator) -> torch.Tensor:
    """Random values around a 0.05 grid with exact ties, NaN, +-inf and values far outside the range."""
    x = torch.randn(shape, generator=generator) * 3
    flat = x.view(-1)
    ties = (torch.arange(min(64, flat.numel())) - 32 + 0.5) * 0.05
    flat[: ties.numel()] = ties
    for i, value in enumerate((float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, -0.0)):
        if flat.numel() > 100 + i:
            flat[100 + i] = value
    return x.to(dtype)


def layouts(x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
        yield "sliced", torch.cat([x, x], dim=3)[..., ::2]


def cases(device: str, generator: torch.Generator) -> Iterator[tuple[str, str, tuple]]:
    """(label, op name, arguments on ``device``)."""

    def on(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    def qparams(channels: int | None, low: int = -8, high: int = 7):
        count = 1 if channels is None else channels
        scale = torch.rand(count, generator=generator) * 0.1 + 0.02
        zero_point = torch.randint(low, high + 1, (count,), generator=generator, dtype=torch.int32)
        if channels is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return on(scale), on(zero_point)

    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        for shape in (SHAPE, LONG, (0,), (3, 0, 2)):
            base = special_values(shape, dtype, generator)
            for layout, x in layouts(on(base)):
                label = f"{name} {'x'.join(map(str, shape))} {layout}"
                scale, zero_point = qparams(None)
                for relu in (False, True):
                    yield f"{label} relu={relu}", "fake_quant_per_tensor", (x, scale, zero_point, -128, 127, True, relu)
                unsigned_scale, unsigned_zero_point = qparams(None, 0, 255)
                unsigned = (x, unsigned_scale, unsigned_zero_point, 0, 255, False, False)
                yield label, "fake_quant_per_tensor", unsigned
                for axis in range(x.dim()):
                    scales, zps = qparams(x.size(axis))
                    yield f"{label} axis={axis}", "fake_quant_per_channel", (x, scales, zps, axis, -8, 7, True)
                for clipped in (True, False):
                    yield f"{label} clipped={clipped}", "binarize", (x, clipped, True)
                mask = on(torch.rand(base.shape, generator=generator) < 0.5)
                yield label, "masked_grad", (x, mask if layout == "contiguous" else mask.expand_as(x))
                channels = x.size(0)
                gamma = on(torch.rand(channels, generator=generator) + 0.5)
                var = on(torch.rand(channels, generator=generator))
                if channels:
                    gamma[0] = 0.0  # a zero fold factor: the divided fold divides by 1 there
                bn_scales, bn_zps = qparams(channels)
                finite = x.nan_to_num(0.0, 1.0, -1.0)
                for divide in (False, True):
                    args = (finite, gamma, var, 1e-5, bn_scales, bn_zps, -127, 127)
                    yield f"{label} divide={divide}", "bn_fold_fake_quant_weight", (*args, True, divide)
                    grad = on(torch.randn(base.shape, generator=generator).to(dtype))
                    yield f"{label} divide={divide}", "bn_fold_fake_quant_weight_backward", (grad, *args, divide)
                for axis in (None, *range(x.dim())):
                    scales, zps = qparams(None if axis is None else x.size(axis))
                    learned = zps.float() + 0.4  # a learned zero point: rounded (and clamped) by the op
                    for zero_point in (zps, learned):
                        args = (x, scales, zero_point, axis, -8, 7, 0.05)
                        tag = f"{label} axis={axis} zp={str(zero_point.dtype).removeprefix('torch.')}"
                        yield tag, "fake_quant_learnable", args
                        grad = on(torch.randn(base.shape, generator=generator).to(dtype))
                        yield tag, "fake_quant_learnable_backward", (grad, *args)
                if layout == "contiguous" and x.dim() >= 2 and x.size(1) > 0 and x.size(1) % 3 == 0:
                    # per group of 3 input channels: the [out, in, 1, 1] view of a 1x1 conv weight
                    weight = x.reshape(x.size(0), x.size(1), 1, -1)[..., :1].contiguous()
                    group_scales, group_zps = qparams(x.size(0) * x.size(1) // 3)
                    shape = (x.size(0), x.size(1) // 3)
                    yield label, "fake_quant_per_group", (weight, group_scales.reshape(shape), group_zps.reshape(shape),
                                                          3, -8, 7, True)  # fmt: skip
                if x.numel() == 0:
                    continue  # observe_range of an empty tensor is an error (no range to observe)
                for axis, constant, fold, relu in ((None, 1.0, False, False), (None, 0.01, False, True),
                                                   (1, 1.0, False, False), (0, 0.01, True, False)):  # fmt: skip
                    if (axis == 1 or fold) and x.dim() < 2:
                        continue
                    channels = 1 if axis is None else x.size(axis)
                    tracked = on(torch.randn((2, channels) if axis is not None else (2,), generator=generator))
                    scale_out = on(torch.ones(channels if axis is not None else ()))
                    zp_out = on(torch.zeros(channels if axis is not None else (), dtype=torch.int32))
                    folds = on(torch.rand(x.size(0), generator=generator) + 0.5) if fold else None
                    args = (finite, tracked, scale_out, zp_out, axis, constant, -128, 127, True, folds, relu)
                    yield f"{label} axis={axis} c={constant} fold={fold} relu={relu}", "observe_range", args


# The reference of every op; fake_quant_per_group has no default kernel of its own (it decomposes into
# fake_quant_per_channel), so its reference composition is named here.
REFERENCE = {**_ops.DEFAULT_KERNELS, "fake_quant_per_group": reference.fake_quant_per_group_forward}


def call(name: str, op, args: tuple) -> tuple[torch.Tensor, ...]:
    """The op's outputs; for observe_range, which returns nothing, the state it writes (on copies)."""
    if name == "observe_range":
        state = [t.clone() for t in args[1:4]]
        op(args[0], *state, *args[4:])
        return tuple(state)
    result = op(*args)
    return result if isinstance(result, tuple) else (result,)


def sum_tolerance(name: str, args: tuple) -> float:
    """The absolute tolerance of a kernel's per-channel sums against the reference's (summed in another order):
    1e-6 of a bound on the sum of the terms' magnitudes. A learnable term is at most ``grad_factor * |grad| *
    (quant_max - quant_min)`` (``round(v) - v`` is at most 1/2 and the zero point lies in the range)."""
    if name == "fake_quant_learnable_backward":
        grad, quant_min, quant_max, grad_factor = args[0], args[5], args[6], args[7]
        grad_sum = float(grad.float().abs().nan_to_num(0.0, 0.0, 0.0).sum())
        return 1e-6 * grad_factor * grad_sum * max(1, quant_max - quant_min)
    return 1e-6


def compare(name: str, got: tuple, want: tuple, tolerance: float = 1e-6) -> str | None:
    """None when ``got`` matches ``want``, else what differs; per-channel sums within ``tolerance``."""
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        g = g.cpu()
        if g.dtype != w.dtype or g.shape != w.shape:
            return f"output {index}: {g.dtype}{tuple(g.shape)} vs reference {w.dtype}{tuple(w.shape)}"
        if name in ("bn_fold_fake_quant_weight_backward", "fake_quant_learnable_backward") and index > 0:
            if not torch.allclose(g.float(), w.float(), rtol=1e-5, atol=tolerance, equal_nan=True):
                return f"output {index} (a per-channel sum): {g} vs reference {w}"
            continue
        if g.dtype == torch.bool:
            same = torch.equal(g, w)
        else:
            same = torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(0.0), w.nan_to_num(0.0))
            # -0.0 and +0.0 compare equal above; the bits must match too.
            same = same and torch.equal(torch.signbit(g[~g.isnan()]), torch.signbit(w[~w.isnan()]))
        if not same:
            return f"output {index} differs from the reference"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="device of the tensors (default cuda)")
    parser.add_argument("--backend", default="cuda", choices=fakequant._backend.BACKENDS, help="default cuda")
    args = parser.parse_args(argv)
    fakequant.set_backend(args.backend)
    generator = torch.Generator().manual_seed(0)
    failures, count = [], 0
    for label, name, op_args in cases(args.device, generator):
        count += 1
        try:
            got = call(name, getattr(torch.ops.fakequant, name), op_args)
            cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in op_args)
            want = call(name, REFERENCE[name], cpu_args)
            problem = compare(name, got, want, sum_tolerance(name, cpu_args))
        except Exception as error:  # noqa: BLE001  (report every failing case, not only the first)
            problem = f"{type(error).__name__}: {error}"
        if problem:
            failures.append(f"{name} [{label}]: {problem}")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    for failure in failures:
        print("MISMATCH", failure)
    print(f"kernel smoke: {count} cases on {args.device} with backend {args.backend}, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
