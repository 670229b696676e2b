"""Shared conventions of every ``bench/bench_*.py`` file: providers, modes, sizes and the bytes-moved model.

A bench file describes one op with an :class:`OpBench` (how to build inputs and how each provider computes
the op) and gets its pytest-benchmark test from :func:`make_test`. Every benchmark then records the same
``extra_info`` fields (see :func:`record`), which ``bench/run.py`` turns into one table, a CSV and a plot.

Providers (what computes the op):

``fakequant``         the ``fakequant::`` op on the default backend (``"auto"``: the compiled C++ kernels on
                      CPU when ``fakequant._C`` is loaded); other non-reference backends present on the device
                      appear as ``fakequant-<backend>``.
``reference``         the pure-PyTorch composition: ``fakequant.reference.*_forward`` for the forward modes and
                      the differentiable ``fakequant.reference.*`` functions for forward+backward.
``torch``             ``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``.
``compile``           ``torch.compile`` of the reference composition (the arithmetic only: the reference's
                      argument checks call ``bool(tensor)``, which would split the graph; they run once, eagerly).
``nni``               NNI 3.x's fake-quant autograd functions, only when ``nni`` is importable.
``torchao``           torchao's implementation of the same float format (its fake quantizer, or its quantize
                      and dequantize round trip with a straight-through backward), only when torchao imports.
``copy``              ``torch.add(x, 0, out=y)``: reads and writes one tensor, the bandwidth anchor.
``copy-alloc``        ``torch.add(x, 0)``: the same into a fresh tensor (what allocating an output costs).

Modes: ``fwd`` (no gradient, no mask written), ``fwd+mask`` (the forward that writes the 1-byte mask a
backward needs), ``fwd+bwd`` (forward then ``backward`` of a fixed gradient). ``copy`` runs in mode ``copy``.

Bytes moved per element (the least any implementation must move; ``s`` = element size, 4 for fp32):
copy ``2s`` (8), fwd ``2s`` (8), fwd+mask ``2s + 1`` (9), fwd+bwd ``(2s + 1) + (2s + 1)`` (18: the backward
reads the gradient and the mask and writes the input's gradient). Ops whose backward recomputes the mask from
the input instead (the BN fold, which reads the weight anyway for gamma's gradient) pass ``mask_recomputed``:
fwd+bwd ``2s + 3s`` (20: no mask written or read, the input read twice).

Environment: ``FAKEQUANT_BENCH_QUICK=1`` picks the few sizes of ``python bench/run.py --quick``;
``FAKEQUANT_BENCH_SIZES`` (comma-separated powers of two, e.g. ``20,22,24,26``) replaces the sweep and drops the
ResNet-50 shapes; ``FAKEQUANT_BENCH_DEVICE`` (default ``cpu``); ``FAKEQUANT_BENCH_DTYPE`` (``float32``, the
default, ``bfloat16`` or ``float16``: the tensor being quantized); ``FAKEQUANT_BENCH_PROVIDERS`` (comma-separated)
keeps only those providers; ``FAKEQUANT_BENCH_THREADS`` (default 2) sets ``torch.set_num_threads``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

import fakequant
from bench.providers import rank
from fakequant import _backend
from tests import autograd_reference

THREADS = int(os.environ.get("FAKEQUANT_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)

QUICK = os.environ.get("FAKEQUANT_BENCH_QUICK", "") not in ("", "0")
DEVICE = torch.device(os.environ.get("FAKEQUANT_BENCH_DEVICE", "cpu"))
BENCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_from_environment() -> torch.dtype:
    name = os.environ.get("FAKEQUANT_BENCH_DTYPE", "") or "float32"
    if name not in BENCH_DTYPES:
        raise ValueError(f"FAKEQUANT_BENCH_DTYPE={name!r}; allowed: {', '.join(BENCH_DTYPES)}")
    return BENCH_DTYPES[name]


DTYPE = _dtype_from_environment()
# Every provider allocates its outputs on every call; with glibc's defaults a freed 2^22-element (16 MiB) output
# is often, and a 2^24 one always, returned to the kernel and page-faulted in again on the next call, so the
# table would time the page faults (docs/benchmarks.md, "Numbers once quoted in bench comments", has how much).
# FAKEQUANT_BENCH_DEFAULT_MALLOC=1 keeps glibc's defaults.
FREED_MEMORY_RETAINED = (
    os.environ.get("FAKEQUANT_BENCH_DEFAULT_MALLOC", "") in ("", "0") and fakequant.retain_freed_memory()
)

MODES = ("fwd", "fwd+mask", "fwd+bwd")
COPY_MODE = "copy"


def _sizes_from_environment() -> tuple[int, ...] | None:
    text = os.environ.get("FAKEQUANT_BENCH_SIZES", "").strip()
    if not text:
        return None
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or not all(0 <= v <= 31 for v in sizes):
        raise ValueError(f"FAKEQUANT_BENCH_SIZES={text!r}; allowed: comma-separated powers of two 0..31, e.g. 20,22")
    return sizes


# Flat sizes: 2^16 (per-call overhead dominates) to 2^24 (64 MiB fp32, far past the last-level cache).
# --quick keeps two, so every plot still draws a line. FAKEQUANT_BENCH_SIZES replaces them (and drops the
# ResNet-50 shapes): a GPU's 50 MB L2 needs 2^24 and 2^26 to measure memory rather than cache.
SIZES_OVERRIDE = _sizes_from_environment()
FLAT_LOG2 = SIZES_OVERRIDE or ((18, 22) if QUICK else (16, 18, 20, 22, 24))

# torch.compile specializes on every shape and flag; the default recompile limit (8) would silently fall
# back to eager after a few sizes.
torch._dynamo.config.cache_size_limit = 256
torch._dynamo.config.accumulated_cache_size_limit = 4096


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One tensor to benchmark.

    Args:
        label: the size column of the table (``"2^22"``, ``"w 512x512x3x3"``).
        shape: the tensor's shape.
        axis: the channel axis for per-channel ops (0 for weights, 1 for NCHW activations).
        kind: ``"flat"`` (the size sweep, plotted as lines), ``"weight"`` or ``"activation"`` (ResNet-50
            shapes, plotted as points).
    """

    label: str
    shape: tuple[int, ...]
    axis: int = 0
    kind: str = "flat"

    @property
    def test_id(self) -> str:
        """The label as a pytest id that ``-k`` accepts (``2_22``, ``w_512x512x3x3``)."""
        return self.label.replace("^", "_").replace(" ", "_")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def flat_cases(channels: int | None = None) -> list[Case]:
    """The size sweep 2^16..2^24: 1-D tensors, or ``(channels, n / channels)`` for per-channel ops."""
    cases = []
    for log2 in FLAT_LOG2:
        n = 1 << log2
        shape = (n,) if channels is None else (channels, n // channels)
        cases.append(Case(f"2^{log2}", shape, 0, "flat"))
    return cases


def _shape_label(prefix: str, shape: Sequence[int]) -> str:
    return prefix + " " + "x".join(str(d) for d in shape)


# ResNet-50 (torchvision) conv and fc weights, output channels first. 512x512x3x3 is the largest 3x3
# conv (layer4), 2048x512x1x1 the largest 1x1 expansion, 1000x2048 the classifier.
RESNET50_WEIGHT_SHAPES = ((64, 64, 3, 3), (256, 256, 3, 3), (512, 512, 3, 3), (2048, 512, 1, 1), (1000, 2048))
# ResNet-50 activations for a batch of 8 224x224 images (NCHW): the stem output, a layer1 output (6.4M
# elements each, 25.7 MB) and the last stage; batch 32 (103 MB each) would make a full run far longer.
RESNET50_ACTIVATION_SHAPES = ((8, 64, 112, 112), (8, 256, 56, 56), (8, 2048, 7, 7))
QUICK_WEIGHT_SHAPES = ((256, 256, 3, 3),)  # the BN fold's target is stated on this shape (bench_bn_fold.py)
QUICK_ACTIVATION_SHAPES = ((8, 256, 56, 56),)


def resnet50_weight_cases(in_quick: bool = True) -> list[Case]:
    """ResNet-50 weight shapes (channel axis 0); ``in_quick=False`` drops them from a --quick run."""
    shapes = (QUICK_WEIGHT_SHAPES if in_quick else ()) if QUICK else RESNET50_WEIGHT_SHAPES
    if SIZES_OVERRIDE:
        shapes = ()
    return [Case(_shape_label("w", s), tuple(s), 0, "weight") for s in shapes]


def resnet50_activation_cases(in_quick: bool = True) -> list[Case]:
    """ResNet-50 activation shapes (NCHW, channel axis 1); ``in_quick=False`` drops them from a --quick run."""
    shapes = (QUICK_ACTIVATION_SHAPES if in_quick else ()) if QUICK else RESNET50_ACTIVATION_SHAPES
    if SIZES_OVERRIDE:
        shapes = ()
    return [Case(_shape_label("act", s), tuple(s), 1, "activation") for s in shapes]


# ---------------------------------------------------------------------------------------------
# Bytes moved and the record every benchmark writes
# ---------------------------------------------------------------------------------------------


def bytes_moved(mode: str, numel: int, itemsize: int = 4, mask_recomputed: bool = False) -> int:
    """The least number of bytes an implementation of ``mode`` moves over ``numel`` elements.

    Args:
        mode: ``"copy"``, ``"fwd"``, ``"fwd+mask"`` or ``"fwd+bwd"``.
        numel: elements of the input.
        itemsize: bytes per element of the input (4 for fp32).
        mask_recomputed: the backward reads the input and recomputes the mask from it instead of reading one
            (fwd+bwd only: the forward then writes no mask).

    Example:
        >>> bytes_moved("fwd+bwd", 1 << 20)
        18874368
    """
    per_element = {
        COPY_MODE: 2 * itemsize,
        "fwd": 2 * itemsize,
        "fwd+mask": 2 * itemsize + 1,
        "fwd+bwd": 5 * itemsize if mask_recomputed else 2 * (2 * itemsize + 1),
    }
    if mode not in per_element:
        raise ValueError(f"bytes_moved: unknown mode {mode!r}; allowed: {', '.join(per_element)}")
    return per_element[mode] * numel


def extra_info(*, op: str, provider: str, mode: str, case: Case, nbytes: int) -> dict:
    """The fields every benchmark records and ``bench/run.py`` reads."""
    return dict(
        op=op,
        provider=provider,
        mode=mode,
        size=case.label,
        shape="x".join(str(d) for d in case.shape),
        kind=case.kind,
        numel=case.numel,
        bytes=nbytes,
        dtype=str(DTYPE).removeprefix("torch."),
        device=str(DEVICE),
        threads=torch.get_num_threads(),
        backend=fakequant.get_backend(),
        extension_loaded=fakequant.extension_loaded(),
    )


def record(benchmark, *, op: str, provider: str, mode: str, case: Case, nbytes: int) -> None:
    """Writes the ``extra_info`` fields that ``bench/run.py`` reads."""
    benchmark.extra_info.update(extra_info(op=op, provider=provider, mode=mode, case=case, nbytes=nbytes))


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------


GPU_BACKENDS = ("cuda", "triton")


def fakequant_backends() -> dict[str, str]:
    """Provider name -> fakequant backend, for every non-reference backend that runs on ``DEVICE``."""
    found = {}
    previous = fakequant.get_backend()
    probe = torch.zeros(4, device=DEVICE)
    available = getattr(_backend, "available_backends", lambda device: _backend.BACKENDS)
    try:
        for backend in available(DEVICE):
            if backend == "reference":
                continue  # the `reference` provider measures the composition without the dispatcher
            if DEVICE.type == "cpu" and backend in GPU_BACKENDS:
                continue  # on CPU tensors these are the C++ kernels again, or the (slow) Triton interpreter
            try:
                fakequant.set_backend(backend)
                torch.ops.fakequant.binarize(probe)
            except Exception:  # noqa: BLE001  (a backend absent on this device is simply not benchmarked)
                continue
            found["fakequant" if backend == "auto" else f"fakequant-{backend}"] = backend
    finally:
        fakequant.set_backend(previous)
    if DEVICE.type == "cuda" and "fakequant-cuda" in found:
        # On CUDA tensors "auto" is the CUDA kernels again: timing it twice would only add noise to the table.
        found.pop("fakequant", None)
    return found


FAKEQUANT_BACKENDS = fakequant_backends()


def nni_available() -> bool:
    try:
        import nni.compression.base.apply_method  # noqa: F401
    except Exception:  # noqa: BLE001  (any failure to import NNI just drops the provider)
        return False
    return True


NNI = nni_available()


def torchao_available() -> bool:
    try:
        import torchao.prototype.mx_formats.mx_tensor  # noqa: F401
    except Exception:  # noqa: BLE001  (any failure to import torchao just drops the provider)
        return False
    return True


TORCHAO = torchao_available()


def nni_target_space(scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, output: bool):
    """The attributes NNI 3.x's ``QATClampRound``/``BNNClampRound`` read from a target space."""
    from nni.compression.base.target_space import TargetType

    return SimpleNamespace(
        scale=scale,
        zero_point=zero_point,
        qmin=quant_min,
        qmax=quant_max,
        _scaler=None,
        type=TargetType.OUTPUT if output else TargetType.PARAMETER,
    )


def selected(provider: str) -> bool:
    wanted = os.environ.get("FAKEQUANT_BENCH_PROVIDERS", "")
    if not wanted:
        return True
    names = {p.strip() for p in wanted.split(",")}
    return provider in names or provider.split("-")[0] in names


# ---------------------------------------------------------------------------------------------
# The op description a bench file writes, and the test built from it
# ---------------------------------------------------------------------------------------------

Inputs = SimpleNamespace  # x (the tensor differentiated), grad (its output gradient), plus op arguments
ForwardFn = Callable[[Inputs, bool], object]  # (inputs, compute_mask) -> anything; runs without grad
DiffFn = Callable[[Inputs], torch.Tensor]  # inputs -> differentiable output


@dataclass
class OpBench:
    """How each provider computes one op. ``None`` means the provider has no such op.

    Args:
        op: the op's short name in the table (``"per_channel"``).
        cases: the tensors to benchmark.
        make_inputs: builds the op's arguments for a case (``x`` must be among them).
        fused_forward: ``torch.ops.fakequant.<op>(..., compute_mask)``.
        fused_differentiable: the public wrapper (``fakequant.<op>``), which writes the mask only when needed.
        reference_forward: ``reference.<op>_forward(..., compute_mask)``.
        reference_differentiable: ``reference.<op>``.
        composition_forward: the reference arithmetic without argument checks, for ``torch.compile``.
        composition_differentiable: the same with the straight-through estimator, for ``torch.compile``.
        torch_differentiable: PyTorch's own fake-quant op, if there is one (also timed without grad).
        nni_differentiable: NNI's fake-quant function (only called when NNI imports).
        torchao_differentiable: torchao's implementation (only called when torchao imports).
        differentiable_inputs: names of the inputs that get gradients in fwd+bwd (``x`` first).
        mask_recomputed: see :func:`bytes_moved`.
        modes: the modes the fused and reference providers run (an op without a mask has no ``fwd+mask``).
    """

    op: str
    cases: list[Case]
    make_inputs: Callable[[Case], Inputs]
    fused_forward: ForwardFn
    fused_differentiable: DiffFn
    reference_forward: ForwardFn
    reference_differentiable: DiffFn
    composition_forward: ForwardFn | None = None
    composition_differentiable: DiffFn | None = None
    torch_differentiable: DiffFn | None = None
    nni_differentiable: DiffFn | None = None
    torchao_differentiable: DiffFn | None = None
    differentiable_inputs: tuple[str, ...] = ("x",)
    mask_recomputed: bool = False
    modes: tuple[str, ...] = MODES
    _compiled: dict = field(default_factory=dict)

    def providers(self) -> list[tuple[str, tuple[str, ...]]]:
        """(provider, modes) pairs this op supports on ``DEVICE``, in table order."""
        # copy-alloc: the same copy into a new tensor, as every functional op allocates its output; the gap to
        # `copy` is what the allocation (page faults of fresh memory included) costs.
        rows = [("copy", (COPY_MODE,)), ("copy-alloc", (COPY_MODE,))]
        rows += [(name, self.modes) for name in FAKEQUANT_BACKENDS]
        rows.append(("reference", self.modes))
        if self.torch_differentiable is not None:
            rows.append(("torch", ("fwd", "fwd+bwd")))
        if self.composition_forward is not None:
            modes = tuple(m for m in ("fwd", "fwd+mask") if m in self.modes)
            rows.append(("compile", modes + (("fwd+bwd",) if self.composition_differentiable else ())))
        if self.nni_differentiable is not None and NNI:
            rows.append(("nni", ("fwd", "fwd+bwd")))
        if self.torchao_differentiable is not None and TORCHAO:
            rows.append(("torchao", ("fwd", "fwd+bwd")))
        rows.sort(key=lambda row: rank(row[0]))  # bench/providers.py's order; stable, so variants keep theirs
        return [(p, m) for p, m in rows if selected(p)]

    def params(self) -> list:
        """pytest parameters (provider, mode, case) with readable ids."""
        out = []
        for case in self.cases:
            for provider, modes in self.providers():
                for mode in modes:
                    out.append(pytest.param(provider, mode, case, id=f"{case.test_id}-{provider}-{mode}"))
        return out

    def _compiled_fn(self, kind: str) -> Callable:
        if kind not in self._compiled:
            source = self.composition_forward if kind == "forward" else self.composition_differentiable
            # On a GPU one dynamic-shape graph serves every size: the benchmark compiles each op's graphs once
            # instead of once per size (Inductor's elementwise kernels take the element count as an argument).
            self._compiled[kind] = torch.compile(source, dynamic=DEVICE.type == "cuda")
        return self._compiled[kind]

    def build(self, provider: str, mode: str, case: Case, synchronize: bool = True) -> Callable[[], object]:
        """The zero-argument callable that pytest-benchmark times; on a GPU it waits for the device unless
        ``synchronize=False`` (the interleaved timing brackets a batch of calls with CUDA events instead)."""
        _synced = _synchronized if synchronize else (lambda fn: fn)
        inputs = self.make_inputs(case)
        if provider == "copy":
            x, y = inputs.x, torch.empty_like(inputs.x)
            return _synced(lambda: torch.add(x, 0, out=y))
        if provider == "copy-alloc":
            x = inputs.x
            return _synced(lambda: torch.add(x, 0))
        if mode in ("fwd", "fwd+mask"):
            compute_mask = mode == "fwd+mask"
            forward = {
                "reference": self.reference_forward,
                "compile": self._compiled_fn("forward") if provider == "compile" else None,
                "torch": _no_mask_arg(self.torch_differentiable),
                "nni": _no_mask_arg(self.nni_differentiable),
                "torchao": _no_mask_arg(self.torchao_differentiable),
            }.get(provider, self.fused_forward)

            def run_forward():
                with torch.no_grad():
                    return forward(inputs, compute_mask)

            return _synced(run_forward)
        differentiable = {
            "reference": self.reference_differentiable,
            "compile": self._compiled_fn("differentiable") if provider == "compile" else None,
            "torch": self.torch_differentiable,
            "nni": self.nni_differentiable,
            "torchao": self.torchao_differentiable,
        }.get(provider, self.fused_differentiable)
        leaves = [getattr(inputs, name) for name in self.differentiable_inputs]
        for leaf in leaves:
            leaf.requires_grad_(True)
        grad = torch.randn_like(inputs.x)

        def run_forward_backward():
            for leaf in leaves:
                leaf.grad = None
            differentiable(inputs).backward(grad)

        return _synced(run_forward_backward)

    def bytes(self, mode: str, case: Case) -> int:
        return bytes_moved(mode, case.numel, DTYPE.itemsize, self.mask_recomputed)


def _no_mask_arg(fn: DiffFn | None) -> ForwardFn | None:
    return None if fn is None else (lambda inputs, compute_mask: fn(inputs))


def _synchronized(fn: Callable[[], object]) -> Callable[[], object]:
    if DEVICE.type != "cuda":
        return fn

    def synced():
        fn()
        torch.cuda.synchronize(DEVICE)

    return synced


# Two untimed calls before timing: the first compiles (torch.compile) or allocates, the second settles caches.
WARMUP_CALLS = 2


def run(benchmark, spec: OpBench, provider: str, mode: str, case: Case) -> None:
    """Times one (provider, mode, case) of ``spec`` and records its ``extra_info``."""
    backend = FAKEQUANT_BACKENDS.get(provider)
    previous = fakequant.get_backend()
    if backend is not None:
        fakequant.set_backend(backend)
    try:
        fn = spec.build(provider, mode, case)
        for _ in range(WARMUP_CALLS):
            fn()
        benchmark(fn)
    finally:
        fakequant.set_backend(previous)
    record(benchmark, op=spec.op, provider=provider, mode=mode, case=case, nbytes=spec.bytes(mode, case))


def make_test(spec: OpBench) -> Callable:
    """The pytest-benchmark test function of ``spec``, parametrized over its providers, modes and cases."""

    @pytest.mark.parametrize(("provider", "mode", "case"), spec.params())
    def test(benchmark, provider: str, mode: str, case: Case) -> None:
        benchmark.group = f"{spec.op} {mode if mode != COPY_MODE else 'fwd'} {case.label}"
        run(benchmark, spec, provider, mode, case)

    test.__name__ = f"test_{spec.op}"
    return test


def _cuda_repetitions(fn: Callable[[], object], floor_s: float = 1e-3, cap: int = 1000) -> int:
    """How many back-to-back calls of ``fn`` fill ``floor_s`` of GPU time: one call of a 2^20-element op takes a
    few microseconds, less than a launch and a synchronization, so a round times a batch of calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one_call_s = max(start.elapsed_time(end) * 1e-3, 1e-7)
    return max(1, min(cap, int(floor_s / one_call_s) + 1))


def _time_round(fn: Callable[[], object], repetitions: int) -> float:
    """Seconds per call over one round: wall clock on the CPU; CUDA events around ``repetitions`` calls on a
    GPU (the calls queue back to back, so launch latency overlaps the previous kernel, as in training)."""
    import time

    if DEVICE.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repetitions):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / repetitions


def interleaved(
    spec: OpBench, case: Case, rounds: int, keep: Callable[[str], bool] | None = None, failed: list | None = None
) -> list[dict]:
    """Times every (provider, mode) of ``case`` round-robin: each round calls each of them once, so a burst of
    load from other processes lands on all of them alike (pytest-benchmark times one after another). ``keep``
    chooses by name (``op[<case>-<provider>-<mode>]``) which ones run. A provider that fails to build or run
    (a dtype PyTorch's own op lacks, say) is left out and its error appended to ``failed``; the others still run.

    Returns entries shaped like pytest-benchmark's JSON (``name``, ``extra_info``, ``stats`` with median, min,
    iqr and rounds), which ``bench/run.py`` reads like a pytest-benchmark run.
    """
    import statistics
    import traceback

    entries = []
    for provider, modes in spec.providers():
        for mode in modes:
            name = f"{spec.op}[{case.test_id}-{provider}-{mode}]"
            if keep is not None and not keep(name):
                continue
            backend = FAKEQUANT_BACKENDS.get(provider, "auto")
            fakequant.set_backend(backend)
            try:
                fn = spec.build(provider, mode, case, synchronize=False)
                for _ in range(WARMUP_CALLS):
                    fn()
                repetitions = _cuda_repetitions(fn) if DEVICE.type == "cuda" else 1
            except Exception:  # noqa: BLE001  (report the provider and keep measuring the others)
                if failed is None:
                    raise
                failed.append(f"{name}: {traceback.format_exc(limit=1).strip().splitlines()[-1]}")
                continue
            finally:
                fakequant.set_backend("auto")
            info = extra_info(op=spec.op, provider=provider, mode=mode, case=case, nbytes=spec.bytes(mode, case))
            info["backend"] = backend
            info["calls_per_round"] = repetitions
            entries.append((name, backend, fn, info, [], repetitions))
    for _ in range(rounds):
        for _name, backend, fn, _info, times, repetitions in entries:
            if backend != "auto":
                fakequant.set_backend(backend)
            try:
                times.append(_time_round(fn, repetitions))
            finally:
                if backend != "auto":
                    fakequant.set_backend("auto")
    results = []
    for name, _, _, info, times, _ in entries:
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        stats = {
            "median": statistics.median(times),
            "min": min(times),
            "iqr": quartiles[2] - quartiles[0],
            "rounds": len(times),
        }
        results.append({"name": name, "extra_info": info, "stats": stats})
    return results


# ---------------------------------------------------------------------------------------------
# Helpers for the composition that torch.compile sees
# ---------------------------------------------------------------------------------------------


def straight_through(out: torch.Tensor, mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``out`` in the forward pass; the gradient reaches ``source`` where ``mask`` holds (the reference's STE)."""
    return autograd_reference._StraightThrough.apply(out, autograd_reference._masked_source(source, mask))


def qparams_like(x: torch.Tensor, axis: int | None, quant_min: int = -128, quant_max: int = 127, seed: int = 0):
    """Realistic affine qparams for ``x``: a range of about +-3 sigma (a few elements clip), per tensor or
    per channel along ``axis``, with small nonzero zero points so the affine path runs."""
    generator = torch.Generator().manual_seed(seed)
    channels = 1 if axis is None else x.size(axis)
    spread = 0.5 + torch.rand(channels, generator=generator)  # per-channel scales differ by up to 3x
    scale = (6.0 * spread / (quant_max - quant_min)).to(torch.float32)
    zero_point = torch.randint(-8, 9, (channels,), generator=generator, dtype=torch.int32)
    zero_point = zero_point.clamp(quant_min, quant_max)
    if axis is None:
        scale, zero_point = scale.reshape(1), zero_point.reshape(1)
    return scale.to(x.device), zero_point.to(x.device)


def random_input(case: Case, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(case.shape, generator=generator, dtype=DTYPE).to(DEVICE)
