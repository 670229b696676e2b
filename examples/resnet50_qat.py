"""ResNet-50 quantization-aware training with fakequant: the swap-in for an NNI QAT_Quantizer user.

Trains torchvision's ResNet-50 three times from the same weights on the same batches, the three taking their
steps in turn, and reports the time per training step (forward, loss, backward, optimizer step) of each:

* ``FP32``: the float model;
* ``QAT (fakequant)``: ``QAT_Quantizer`` with 8-bit per-channel symmetric weights and 8-bit affine inputs on
  every Conv2d and Linear, and every Conv+BN pair folded (the BN-folded weight fake-quantized by one fused op);
* ``QAT (reference)``: the same quantizer after ``fakequant.set_backend("reference")``, every fakequant op
  computed by its pure-PyTorch composition: what a QAT library written in plain PyTorch pays.

It finishes by ``export_model`` of the fakequant QAT model (float folded weights + calibration).

    python examples/resnet50_qat.py                            # synthetic 224x224 data: 1-2 minutes on 2 CPU cores
    python examples/resnet50_qat.py --image-size 64 --batch-size 8      # 64x64: where the weights dominate
    python examples/resnet50_qat.py --data ~/imagenet/train --image-size 224 --batch-size 64 \\
        --steps 50 --device cuda                               # a real folder of images on a GPU
    python examples/resnet50_qat.py --device cuda --batch-size 64 --backends cuda triton \\
        --precisions fp32 bf16 --json steps.json               # each GPU backend, also under bf16 autocast

The default input is ImageNet's training resolution with a batch that 2 CPU cores finish in seconds per step. At
64x64 the activations are 12 times smaller while the 25M weights are not, and the weights' extra passes (range,
folded fake quant, its backward) weigh more, so the QAT step costs more over the FP32 step there
(docs/benchmarks.md has both).

On the CPU the script first calls ``fakequant.retain_freed_memory()`` (``--default-malloc`` skips it), so that no
configuration's steps are slowed by page-faulting its freed memory back in: with glibc's defaults the QAT step pays
for that several times more than the FP32 step, and how much depends on what else ran in the process.

Activations are quantized as inputs of the weighted layers rather than as outputs of ReLU: torchvision's
Bottleneck calls one ReLU module three times, and an output hook there would share one range across three
different tensors.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import fakequant

CONFIG_LIST = [
    {
        "quant_types": ["weight", "input"],
        "quant_bits": {"weight": 8, "input": 8},
        "quant_scheme": {"weight": "per_channel_symmetric", "input": "per_tensor_affine"},
        "op_types": ["Conv2d", "Linear"],
    }
]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (stride on the 3x3 conv), for machines without torchvision."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class _ResNet50(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, in_channels = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(_Bottleneck(in_channels, width, stride if i == 0 else 1))
                in_channels = width * 4
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_resnet50(num_classes: int) -> tuple[nn.Module, str]:
    try:
        import torchvision
    except ImportError:
        return _ResNet50(num_classes), "bundled ResNet-50 definition (torchvision not installed)"
    return torchvision.models.resnet50(weights=None, num_classes=num_classes), f"torchvision {torchvision.__version__}"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def make_loader(args) -> tuple[torch.utils.data.DataLoader, int, str]:
    total = args.batch_size * (args.warmup + args.steps)
    if args.data:
        from torchvision import datasets, transforms

        transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(args.image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
        dataset = datasets.ImageFolder(args.data, transform)
        classes = len(dataset.classes)
        generator = torch.Generator().manual_seed(args.seed)
        # The same images in the same order for every configuration compared.
        subset = torch.randperm(len(dataset), generator=generator)[:total].tolist()
        dataset = torch.utils.data.Subset(dataset, subset)
        source = f"ImageFolder {args.data} ({classes} classes)"
    else:
        generator = torch.Generator().manual_seed(args.seed)
        classes = args.num_classes
        images = torch.randn(total, 3, args.image_size, args.image_size, generator=generator)
        labels = torch.randint(0, classes, (total,), generator=generator)
        dataset = torch.utils.data.TensorDataset(images, labels)
        source = f"synthetic ({classes} classes; pass --data DIR for an ImageFolder)"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, drop_last=True, num_workers=args.workers
    )
    # Batches are loaded once, before timing, so the step time measures training alone.
    return list(loader), classes, source


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class Configuration:
    """One model being trained: FP32, or QAT on a given fakequant backend; in fp32 or under bf16 autocast."""

    def __init__(
        self, name: str, float_model: nn.Module, batches, args, quantize: bool, backend: str, precision: str = "fp32"
    ) -> None:
        self.name, self.backend, self.precision = name, backend, precision
        self.model = copy.deepcopy(float_model).to(args.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        self.quantizer = None
        if quantize:
            dummy_input = batches[0][0][:1].to(args.device)
            self.quantizer = fakequant.QAT_Quantizer(
                self.model, CONFIG_LIST, self.optimizer, dummy_input=dummy_input, bn_folding=not args.no_bn_fold
            )
            self.model = self.quantizer.compress()
        self.model.train()
        self.times: list[float] = []
        self.loss = float("nan")

    def step(self, images: torch.Tensor, labels: torch.Tensor, timed: bool) -> None:
        """One training step (forward, loss, backward, optimizer step) on this configuration's backend."""
        device = images.device
        fakequant.set_backend(self.backend)
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                loss = nn.functional.cross_entropy(self.model(images), labels)
            loss.backward()
            self.optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
        finally:
            fakequant.set_backend("auto")
        if timed:
            self.times.append(elapsed)
        self.loss = loss.item()


def train_interleaved(configurations: list[Configuration], batches, args) -> None:
    """Every configuration takes step i on batch i before any takes step i + 1, so that a change in the
    machine's load during the run hits all of them alike."""
    from tqdm import tqdm

    device = torch.device(args.device)
    for i, (images, labels) in enumerate(tqdm(batches, desc="training steps", unit="step")):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        for configuration in configurations:
            configuration.step(images, labels, timed=i >= args.warmup)


def result_rows(results: list[Configuration], batch_size: int) -> list[dict]:
    """Median and mean step time of each configuration, and its ratio to the FP32 step of the same precision."""
    fp32 = {r.precision: statistics.median(r.times) for r in results if r.quantizer is None}
    rows = []
    for r in results:
        median = statistics.median(r.times)
        rows.append(
            {
                "configuration": r.name, "precision": r.precision, "backend": r.backend,
                "quantized": r.quantizer is not None, "median_s": median, "mean_s": statistics.fmean(r.times),
                "x_fp32": median / fp32[r.precision], "images_per_s": batch_size / median, "last_loss": r.loss,
            }
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="an ImageFolder directory (default: synthetic images)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--image-size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--batch-size", type=int, default=16, help="default 16")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per configuration (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic data (default 10)")
    parser.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (default 1e-3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (default 2)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bn-fold", action="store_true", help="quantize conv weights without BN folding")
    parser.add_argument("--skip-reference", action="store_true", help="skip the reference-backend QAT run")
    parser.add_argument(
        "--backends", nargs="+", choices=fakequant._backend.BACKENDS, default=["auto"],
        help="fakequant backends to train QAT with, each a configuration (default: auto); the reference backend "
        "is added unless --skip-reference",
    )
    parser.add_argument(
        "--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
        help="fp32, and/or bf16 (every configuration again under torch.autocast(bfloat16)); default fp32",
    )
    parser.add_argument("--json", type=Path, help="also write the results table here as JSON")
    parser.add_argument("--export-dir", type=Path, help="where export_model writes (default: a temporary dir)")
    parser.add_argument(
        "--default-malloc", action="store_true",
        help="do not call fakequant.retain_freed_memory() (CPU step times then include page faults)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # Every configuration allocates its activations, gradients and (QAT) folded weights anew on each step; with
    # glibc's defaults the CPU steps page-fault that memory in again every time (see fakequant.memory).
    retained = args.device == "cpu" and not args.default_malloc and fakequant.retain_freed_memory()

    batches, classes, source = make_loader(args)
    float_model, model_source = make_resnet50(classes)
    print(
        f"ResNet-50 ({model_source}), data: {source}; {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{args.warmup} warmup + {args.steps} timed steps, device {args.device}"
        + (f", threads: {torch.get_num_threads()}" if args.device == "cpu" else "")
        + (", freed memory retained (fakequant.retain_freed_memory)" if retained else "")
        + f"; fakequant compiled kernels loaded: {fakequant.extension_loaded()}"
    )
    backends = list(dict.fromkeys(b for b in args.backends if b != "reference"))
    if not args.skip_reference:
        backends.append("reference")
    configurations = []
    for precision in args.precisions:
        tag = "" if precision == "fp32" else f" {precision}"
        configurations.append((f"FP32{tag}", False, "auto", precision))
        for backend in backends:
            label = "fakequant" if backend == "auto" else backend
            configurations.append((f"QAT ({label}){tag}", True, backend, precision))
    results = [Configuration(name, float_model, batches, args, q, b, p) for name, q, b, p in configurations]
    train_interleaved(results, batches, args)

    qat = next(r.quantizer for r in results if r.quantizer is not None)
    folded = len(getattr(qat, "folded_pairs", {}) or {})
    print(
        f"\nQAT_Quantizer: {len(qat.layers) if hasattr(qat, 'layers') else '?'} quantized layers, "
        f"{folded} Conv+BN pairs folded" + (" (folding off: --no-bn-fold)" if args.no_bn_fold else "")
    )
    rows = result_rows(results, args.batch_size)
    width = max(16, *(len(row["configuration"]) for row in rows))
    header = (
        f"{'configuration':<{width}} {'median step':>11} {'mean step':>10} {'x FP32':>7} {'images/s':>9} "
        f"{'last loss':>9}"
    )
    print(f"\nTime per training step (forward, loss, backward, SGD step), {args.steps} timed steps each; "
          "x FP32: over the FP32 step of the same precision")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['configuration']:<{width}} {row['median_s'] * 1e3:9.1f}ms {row['mean_s'] * 1e3:8.1f}ms "
            f"{row['x_fp32']:6.2f}x {row['images_per_s']:9.1f} {row['last_loss']:9.3f}"
        )
    if args.json:
        device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
        args.json.write_text(
            json.dumps(
                {
                    "model": model_source, "device": args.device, "device_name": device_name,
                    "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
                    "warmup": args.warmup, "torch": torch.__version__, "rows": rows,
                },
                indent=1,
            )
        )

    export_dir = args.export_dir or Path(tempfile.mkdtemp(prefix="resnet50_qat_"))
    export_dir.mkdir(parents=True, exist_ok=True)
    model_path, calibration_path = export_dir / "resnet50_qat.pth", export_dir / "resnet50_qat_calibration.pth"
    calibration = qat.export_model(model_path, calibration_path)
    print(f"\nexported {model_path} and {calibration_path} ({len(calibration)} calibrated layers)")


if __name__ == "__main__":
    main()
