"""BatchNorm folding in a QAT training step (issue 5's step target; measured here, never asserted).

The fold + fake quant op itself is benchmarked in bench/bench_bn_fold.py.

One SGD step of a small ResNet-style CNN (3x32x32, batch 32, 2 threads): FP32 vs QAT_Quantizer with BN
   folding (live statistics, and frozen) vs QAT_Quantizer without folding. Target: folded QAT <= 1.15x FP32.

Run with pytest-benchmark::

    python -m pytest bench/bench_bn_fold_step.py --benchmark-only

or, for interleaved medians and ratios (less sensitive to a machine whose load drifts)::

    python bench/bench_bn_fold_step.py [rounds]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch import nn

import fakequant

# The setting; FAKEQUANT_BENCH_THREADS=1 gives steadier numbers on a loaded machine.
THREADS = int(os.environ.get("FAKEQUANT_BENCH_THREADS", "2"))
BATCH = 32
WEIGHT_SHAPE = (256, 256, 3, 3)
EPS = 1e-5
class ResidualBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """A stem and three stages of two residual blocks (16, 32, 64 channels): 15 Conv+BN pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, channels = [], 16
        for width, stride in ((16, 1), (16, 1), (32, 2), (32, 1), (64, 2), (64, 1)):
            blocks.append(ResidualBlock(channels, width, stride))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


CONFIG_LIST = [
    {
        "quant_types": ["weight"],
        "quant_bits": 8,
        "op_types": ["Conv2d", "Linear"],
        "quant_scheme": "per_channel_symmetric",
    },
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


def make_step(variant: str):
    """A closure running one SGD step: 'fp32', 'qat-fold', 'qat-fold-frozen' or 'qat-nofold'."""
    torch.manual_seed(0)
    model = ResNetCifar()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if variant != "fp32":
        quantizer = fakequant.QAT_Quantizer(
            model,
            CONFIG_LIST,
            optimizer,
            bn_folding=variant != "qat-nofold",
            freeze_bn_step=0 if variant == "qat-fold-frozen" else None,
        )
        quantizer.compress()
        if variant != "qat-nofold":
            assert len(quantizer.folded_pairs) == 15
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (BATCH,), generator=generator)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    return step


STEP_VARIANTS = ("fp32", "qat-fold", "qat-fold-frozen", "qat-nofold")


# ---------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# ---------------------------------------------------------------------------------------------


def _run(benchmark, make, variant: str, rounds: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        call = make(variant)
        benchmark.extra_info.update(variant=variant, extension_loaded=fakequant.extension_loaded())
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=2)
    finally:
        fakequant.set_backend("auto")
        torch.set_num_threads(threads)


def test_step_fp32(benchmark):
    _run(benchmark, make_step, "fp32", 30)


def test_step_qat_bn_fold(benchmark):
    _run(benchmark, make_step, "qat-fold", 30)


def test_step_qat_bn_fold_frozen(benchmark):
    _run(benchmark, make_step, "qat-fold-frozen", 30)


def test_step_qat_no_fold(benchmark):
    _run(benchmark, make_step, "qat-nofold", 30)


def interleaved(make, variants, rounds: int) -> dict[str, tuple[float, float]]:
    """(median, min) time of each variant, measured round-robin so that load drifts hit all of them alike.

    The min is reported too: on a shared machine a 2-thread parallel region often waits for a descheduled
    thread (seen here: the fused op alternating between 2 ms and 30 ms from one call to the next).
    """
    calls = {variant: make(variant) for variant in variants}
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant, call in calls.items():
            start = time.perf_counter()
            call()
            times[variant].append(time.perf_counter() - start)
    fakequant.set_backend("auto")
    return {variant: (statistics.median(values), min(values)) for variant, values in times.items()}


def _print(results: dict[str, tuple[float, float]], baseline: str) -> None:
    base_median, base_min = results[baseline]
    for variant, (median, fastest) in results.items():
        print(f"  {variant:>24}: median {median * 1e3:9.3f} ms ({median / base_median:5.2f}x {baseline})   "
              f"min {fastest * 1e3:9.3f} ms ({fastest / base_min:5.2f}x)")


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    torch.set_num_threads(THREADS)
    print(f"extension loaded: {fakequant.extension_loaded()}  threads: {THREADS}  rounds: {rounds}")
    print(f"training step, ResNetCifar, batch {BATCH}:")
    _print(interleaved(make_step, STEP_VARIANTS, rounds), "fp32")
