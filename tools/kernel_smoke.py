"""Every ``fakequant::`` op once on tiny tensors, on one device and backend, against the reference.

The GPU check runs this under ``compute-sanitizer --tool memcheck``: a short run that reaches every CUDA kernel
(each op, each dtype, per tensor and per channel along a leading, a middle and the last axis, contiguous,
channels_last and sliced inputs, an empty tensor, an odd element count), so that an out-of-bounds access or a
misaligned vector load shows up as a sanitizer error. Each result is also compared with the reference kernel on
CPU copies of the same inputs: bit for bit, except the per-channel sums of the BN fold's and the learnable op's
backward (the order of a sum differs between kernels; relative 1e-5).

    python tools/kernel_smoke.py --device cuda --backend cuda
    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/kernel_smoke.py --device cuda --backend cuda
    python tools/kernel_smoke.py --device cpu --backend auto      # the C++ kernels (what the tests run)

Exit status 0 when every case matched, 1 otherwise (each mismatch printed).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python tools/kernel_smoke.py` puts tools/ first; a GPU machine installs nothing

import fakequant  # noqa: E402
from fakequant import ops, reference  # noqa: E402

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


@dataclass
class SmokeInput:
    """One input of the smoke run, handed to every op's ``smoke_cases``: ``x`` on the device in one layout, ``base``
    its contiguous CPU original, and helpers that draw parameters from the run's one generator."""

    x: torch.Tensor
    base: torch.Tensor
    layout: str
    device: str
    generator: torch.Generator

    def on(self, t):
        return t.to(self.device) if isinstance(t, torch.Tensor) else t

    def qparams(self, channels: int | None, low: int = -8, high: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
        """A scale in [0.02, 0.12) and an int32 zero point in [low, high]: one element each, or ``channels``."""
        count = 1 if channels is None else channels
        scale = torch.rand(count, generator=self.generator) * 0.1 + 0.02
        zero_point = torch.randint(low, high + 1, (count,), generator=self.generator, dtype=torch.int32)
        if channels is None:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return self.on(scale), self.on(zero_point)

    def rand(self, *shape: int) -> torch.Tensor:
        return self.on(torch.rand(shape, generator=self.generator))

    def randn_like_base(self) -> torch.Tensor:
        """Standard normal values of ``base``'s shape and dtype on the device (a gradient)."""
        return self.on(torch.randn(self.base.shape, generator=self.generator).to(self.base.dtype))


def op_modules() -> list:
    """The op test modules (tests/ops/test_<op>.py) that define ``smoke_cases``: each op's cases live with its
    tests, so a new op brings its own."""
    modules = []
    for path in sorted((ROOT / "tests" / "ops").glob("test_*.py")):
        module = importlib.import_module(f"tests.ops.{path.stem}")
        if hasattr(module, "smoke_cases"):
            modules.append(module)
    return modules


def cases(device: str, generator: torch.Generator) -> Iterator[tuple[str, str, tuple]]:
    """(label, op name, arguments on ``device``): every op's ``smoke_cases`` on every input."""
    modules = op_modules()
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        for shape in (SHAPE, LONG, (0,), (3, 0, 2)):
            base = special_values(shape, dtype, generator)
            for layout, x in layouts(base.to(device)):
                label = f"{name} {'x'.join(map(str, shape))} {layout}"
                smoke_input = SmokeInput(x, base, layout, device, generator)
                for module in modules:
                    for tag, op_name, args in module.smoke_cases(smoke_input):
                        yield f"{label} {tag}".rstrip(), op_name, args


# The reference of every op; the composite ops have no reference kernel of their own (they call other ops), so
# their reference compositions are named here.
REFERENCE = {
    **ops.kernels("reference"),
    "fake_quant_per_group": reference.fake_quant_per_group_forward,
    "fake_quant_learnable": reference.fake_quant_learnable_forward,
}


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
