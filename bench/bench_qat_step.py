"""One training step of a small ResNet-style CNN: FP32 vs QAT_Quantizer, with and without BN folding.

3x32x32 inputs, batch 32, ``torch.set_num_threads(2)``; QAT quantizes Conv2d/Linear weights (8 bits) and the
ReLU outputs (8 bits). Variants: ``qat`` (compiled kernels, Conv+BN pairs folded, the default),
``qat-reference`` (the same on the reference kernels), ``qat-nofold`` (``bn_folding=False``) and
``qat-fold-frozen`` (BN statistics frozen from step 0). Targets: the QAT step without folding costs at most
1.10x the FP32 step, with folding at most 1.15x.

Run with pytest-benchmark::

    python -m pytest bench/bench_qat_step.py --benchmark-only

or, for one interleaved table with the ratios (less sensitive to a machine whose load drifts)::

    python bench/bench_qat_step.py [rounds] [--default-malloc]   # FAKEQUANT_BENCH_THREADS=1 for one thread

Both ways call ``fakequant.retain_freed_memory()`` first, through ``bench/common.py`` as the op benchmarks do
(``--default-malloc`` or ``FAKEQUANT_BENCH_DEFAULT_MALLOC=1`` skips it): with glibc's defaults, how often each
variant page-faults its freed memory back in depends on the other variants in the process. Each ratio is the
median of the per-round ratios to the FP32 step of the same round. docs/benchmarks.md has the measured results
and how they move from run to run.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/bench_qat_step.py` puts bench/ first; bench.common is in the root

import fakequant  # noqa: E402

BATCH = 32
THREADS = int(os.environ.get("FAKEQUANT_BENCH_THREADS", "2"))


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)


class SmallResNet(nn.Module):
    """ResNet-20-like: a stem and three stages of two basic blocks (16, 32, 64 channels)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        blocks, inplanes = [], 16
        for planes, stride in ((16, 1), (16, 1), (32, 2), (32, 1), (64, 2), (64, 1)):
            blocks.append(BasicBlock(inplanes, planes, stride))
            inplanes = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


CONFIG_LIST = [
    {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


# NNI 3.0's QATQuantizer with the settings CONFIG_LIST gives fakequant's QAT_Quantizer: 8-bit signed symmetric per
# tensor weights, 8-bit unsigned affine ReLU outputs. NNI 3.0 folds no BN here, so its row compares with qat-nofold.
NNI_CONFIG_LIST = [
    {"op_types": ["Conv2d", "Linear"], "target_names": ["weight"], "quant_dtype": "int8", "quant_scheme": "symmetric",
     "granularity": "default"},
    {"op_types": ["ReLU"], "target_names": ["_output_"], "quant_dtype": "uint8", "quant_scheme": "affine",
     "granularity": "default"},
]  # fmt: skip


def nni_version() -> str | None:
    """NNI's version when its 3.x quantizers import (``requirements-dev.txt`` installs NNI 3.0), else None."""
    try:
        import nni
        from nni.compression.quantization import QATQuantizer  # noqa: F401
    except Exception:  # noqa: BLE001  (any failure to import NNI leaves its variant out)
        return None
    return nni.__version__


def wrap_with_nni(model: nn.Module) -> None:
    """NNI 3.0's QATQuantizer on ``model``: its wrappers track ranges and fake-quantize from the first training
    forward (quant_start_step 0). Its evaluator only drives ``compress()``'s own training loop, which the
    benchmark does not use: the steps are this file's, as for every other variant."""
    import nni
    from nni.compression.quantization import QATQuantizer
    from nni.compression.utils import TorchEvaluator

    def unused_training_loop(*args, **kwargs):
        raise RuntimeError("the benchmark trains the wrapped model itself")

    traced_optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.9)
    evaluator = TorchEvaluator(unused_training_loop, traced_optimizer, lambda batch, model: None)
    QATQuantizer(model, NNI_CONFIG_LIST, evaluator, quant_start_step=0)


def make_step(variant: str):
    """Returns a closure running one SGD step of ``variant`` (one of :data:`VARIANTS`)."""
    torch.manual_seed(0)
    model = SmallResNet()
    if variant == "qat-nni":
        wrap_with_nni(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if variant not in ("fp32", "qat-nni"):
        fakequant.QAT_Quantizer(
            model,
            CONFIG_LIST,
            optimizer,
            bn_folding=variant != "qat-nofold",
            freeze_bn_step=0 if variant == "qat-fold-frozen" else None,
        ).compress()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (BATCH,), generator=generator)
    backend = "reference" if variant == "qat-reference" else "auto"

    def step() -> None:
        fakequant.set_backend(backend)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: allocator, first-observation branches
        step()
    fakequant.set_backend("auto")
    return step


VARIANTS = ("fp32", "qat", "qat-reference", "qat-nofold", "qat-fold-frozen") + (("qat-nni",) if nni_version() else ())


def _freed_memory_retained() -> bool:
    """Whether bench/common.py, on its import, made freed memory stay in the process (the same setting as the op
    benchmarks: FAKEQUANT_BENCH_DEFAULT_MALLOC=1 keeps glibc's defaults). Without it, how often a variant's step
    page-faults its freed memory back in depends on the other variants in the process (see fakequant.memory)."""
    from bench import common

    return common.FREED_MEMORY_RETAINED


def _bench(benchmark, variant: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    retained = _freed_memory_retained()  # before the model exists, as in the interleaved run
    try:
        step = make_step(variant)
        benchmark.extra_info.update(
            variant=variant, extension_loaded=fakequant.extension_loaded(), freed_memory_retained=retained
        )
        # 10 rounds: a round takes seconds on a contended machine, and the interleaved run is the precise one
        benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
    finally:
        fakequant.set_backend("auto")
        torch.set_num_threads(threads)


def test_step_fp32(benchmark):
    _bench(benchmark, "fp32")


def test_step_qat_fused(benchmark):
    _bench(benchmark, "qat")


def test_step_qat_reference(benchmark):
    _bench(benchmark, "qat-reference")


def test_step_qat_no_fold(benchmark):
    _bench(benchmark, "qat-nofold")


def test_step_qat_fold_frozen(benchmark):
    _bench(benchmark, "qat-fold-frozen")


def test_step_qat_nni(benchmark):
    if "qat-nni" not in VARIANTS:
        raise RuntimeError("NNI 3.x does not import: pip install -r requirements-dev.txt")
    _bench(benchmark, "qat-nni")


def interleaved(rounds: int = 30) -> dict[str, list[float]]:
    """Step times of each variant, measured round-robin so that load drifts hit all of them alike: round ``i``
    of every variant ran within one pass, so ``times[v][i] / times["fp32"][i]`` is a paired ratio."""
    torch.set_num_threads(THREADS)
    steps = {variant: make_step(variant) for variant in VARIANTS}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(rounds):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - start)
    fakequant.set_backend("auto")
    return times


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="QAT training-step variants of a small ResNet, interleaved")
    parser.add_argument("rounds", nargs="?", type=int, default=30, help="rounds of every variant (default 30)")
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's malloc defaults")
    parser.add_argument("--json", type=Path, help="also write the table here as JSON (for bench/readme_plot.py)")
    args = parser.parse_args(argv)
    if args.default_malloc:
        os.environ["FAKEQUANT_BENCH_DEFAULT_MALLOC"] = "1"
    retained = _freed_memory_retained()
    times = interleaved(args.rounds)
    print(f"extension loaded: {fakequant.extension_loaded()}  threads: {THREADS}  batch: {BATCH}  "
          f"freed memory retained: {retained}  nni: {nni_version() or 'not installed'}")
    print(f"{'variant':>15}  {'median':>9}  {'ratio of medians':>16}  {'median of paired ratios':>23}")
    fp32 = statistics.median(times["fp32"])
    rows = []
    for variant, values in times.items():
        paired = statistics.median(t / f for t, f in zip(values, times["fp32"], strict=True))
        median = statistics.median(values)
        rows.append({"variant": variant, "median_s": median, "ratio_of_medians": median / fp32,
                     "median_paired_ratio": paired})  # fmt: skip
        print(f"{variant:>15}  {median * 1e3:6.2f} ms  {median / fp32:15.3f}x  {paired:22.3f}x")
    if args.json:
        meta = {"rounds": args.rounds, "threads": THREADS, "batch": BATCH, "nni": nni_version(),
                "freed_memory_retained": retained, "torch": torch.__version__}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
