"""All four quantizers on scikit-learn's bundled digits (8x8 images, no download): an accuracy table.

Trains one small CNN in float and with each quantizer, the way NNI's docs report MNIST and CIFAR-10 results,
and prints test accuracy and the time of a training step per method (the methods take their steps in turn, and
the first epoch is every method's warm-up)::

    python examples/digits.py                  # about a minute on 2 CPU cores
    python examples/digits.py --epochs 40 --backend reference

Methods: FP32; Naive (8-bit weights of the trained FP32 model, no training); QAT 8-bit (weights of every
Conv2d/Linear and outputs of every ReLU6); DoReFa 4-bit and 8-bit (weights); BNN (1-bit weights of every
conv/linear but the classifier, 1-bit outputs of every Hardtanh, on the same network with Hardtanh in place of
ReLU6, as NNI's VGG example does; its own FP32 baseline is printed beside it).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import fakequant

WEIGHTED = ["Conv2d", "Linear"]
# Module names of the network below (nn.Sequential indices), for the configs that name layers.
CONVS_AND_HIDDEN_LINEAR = ["0", "3", "7", "12"]
ACTIVATIONS = ["2", "5", "9", "14"]


def make_cnn(activation: Callable[[], nn.Module]) -> nn.Sequential:
    """A four-layer CNN for 1x8x8 inputs; ``activation`` is ReLU6 (QAT, DoReFa) or Hardtanh (BNN)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False),  # 0
        nn.BatchNorm2d(32),
        activation(),  # 2
        nn.Conv2d(32, 64, 3, padding=1, bias=False),  # 3
        nn.BatchNorm2d(64),
        activation(),  # 5
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, bias=False),  # 7
        nn.BatchNorm2d(64),
        activation(),  # 9
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 128, bias=False),  # 12
        nn.BatchNorm1d(128),
        activation(),  # 14
        nn.Linear(128, 10),  # 15: the classifier stays float under BNN
    )


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [-1, 1], split 75/25 with every class in proportion."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=seed, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@dataclass
class Method:
    name: str
    weights: str
    activations: str
    activation: type[nn.Module]
    quantize: Callable[[nn.Module, torch.optim.Optimizer, int], object] | None  # (model, optimizer, steps)
    lr: float = 3e-3


def qat_8bit(model, optimizer, total_steps):
    config_list = [
        {"quant_types": ["weight"], "quant_bits": {"weight": 8}, "op_types": WEIGHTED},
        # As in NNI's MNIST example, activations start being quantized after a float warm-up (here a fifth
        # of training); their ranges are tracked from step 0.
        {"quant_types": ["output"], "quant_bits": 8, "quant_start_step": total_steps // 5, "op_types": ["ReLU6"]},
    ]
    return fakequant.QAT_Quantizer(model, config_list, optimizer).compress()


def dorefa(bits):
    def quantize(model, optimizer, total_steps):
        config_list = [{"quant_types": ["weight"], "quant_bits": bits, "op_types": "default"}]
        return fakequant.DoReFaQuantizer(model, config_list, optimizer).compress()

    return quantize


def bnn(model, optimizer, total_steps):
    config_list = [
        {"quant_bits": 1, "quant_types": ["weight"], "op_types": WEIGHTED, "op_names": CONVS_AND_HIDDEN_LINEAR},
        {"quant_bits": 1, "quant_types": ["output"], "op_types": ["Hardtanh"], "op_names": ACTIVATIONS},
    ]
    return fakequant.BNNQuantizer(model, config_list, optimizer).compress()


METHODS = [
    Method("FP32", "fp32", "fp32", nn.ReLU6, None),
    Method("QAT 8-bit", "int8", "uint8", nn.ReLU6, qat_8bit),
    Method("DoReFa 4-bit", "4-bit", "fp32", nn.ReLU6, dorefa(4)),
    Method("DoReFa 8-bit", "8-bit", "fp32", nn.ReLU6, dorefa(8)),
    Method("FP32 (Hardtanh)", "fp32", "fp32", nn.Hardtanh, None),
    # BNN trains better with a larger step (the float weights must cross zero to flip a binary weight).
    Method("BNN", "1-bit", "1-bit", nn.Hardtanh, bnn, lr=1e-2),
]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@dataclass
class Training:
    """One method's model in training, with the CPU time of each of its optimizer steps, epoch by epoch."""

    method: Method
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    step_seconds: list[list[float]]

    def median_step_seconds(self) -> float:
        """The median step after the first epoch, which is every method's warm-up (first calls, allocations)."""
        timed = [t for epoch in self.step_seconds[1:] for t in epoch] or self.step_seconds[0]
        return statistics.median(timed)


def prepare(method: Method, epochs: int, steps_per_epoch: int, seed: int) -> Training:
    """``method``'s model from the same initial weights as every other method's, quantized if it quantizes."""
    torch.manual_seed(seed)
    model = make_cnn(method.activation)
    optimizer = torch.optim.Adam(model.parameters(), lr=method.lr)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    if method.quantize is not None:
        model = method.quantize(model, optimizer, total_steps)
    return Training(method, model, optimizer, scheduler, torch.Generator().manual_seed(seed), [])


def train_interleaved(methods: list[Method], data, epochs: int, batch_size: int, seed: int) -> list[Training]:
    """Trains every method, each on its own shuffles of the same seed, taking their steps in turn: step ``i`` of
    every method runs before step ``i + 1`` of any, so that none is timed at a better place in the process
    (first, on a quieter machine, after another has warmed the allocator) than the others.

    Step times are CPU time of this process rather than wall time: they stay comparable on a shared machine.
    """
    from tqdm import tqdm

    x_train, y_train, _, _ = data
    steps_per_epoch = -(-len(y_train) // batch_size)
    runs = [prepare(method, epochs, steps_per_epoch, seed) for method in methods]
    loss_fn = nn.CrossEntropyLoss()
    for _ in tqdm(range(epochs), desc="training", unit="epoch", leave=False):
        orders = [torch.randperm(len(y_train), generator=run.generator) for run in runs]
        for run in runs:
            run.model.train()
            run.step_seconds.append([])
        for i in range(0, len(y_train), batch_size):
            for run, order in zip(runs, orders, strict=True):
                batch = order[i : i + batch_size]
                start = time.process_time()
                run.optimizer.zero_grad(set_to_none=True)
                loss_fn(run.model(x_train[batch]), y_train[batch]).backward()
                run.optimizer.step()
                run.scheduler.step()
                run.step_seconds[-1].append(time.process_time() - start)
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: these layers are too small to split, and a second thread waits on a busy core at every op.
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--backend", default="auto", help="fakequant backend (auto or reference)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    torch.set_num_threads(args.threads)
    fakequant.set_backend(args.backend)

    data = load_data(args.seed)
    x_test, y_test = data[2], data[3]
    print(
        f"scikit-learn digits: {len(data[1])} train / {len(y_test)} test images (8x8), {args.epochs} epochs, "
        f"batch {args.batch_size}, threads: {torch.get_num_threads()}, fakequant backend {fakequant.get_backend()!r} "
        f"(compiled kernels loaded: {fakequant.extension_loaded()})"
    )
    runs = train_interleaved(METHODS, data, args.epochs, args.batch_size, args.seed)
    rows = []
    for run in runs:
        rows.append((run.method, accuracy(run.model, x_test, y_test), run.median_step_seconds()))
        if run.method.name == "FP32":
            # Naive: 8-bit symmetric weights of the trained float model, no training at all.
            naive = fakequant.NaiveQuantizer(copy.deepcopy(run.model)).compress()
            rows.append((Method("Naive", "int8", "fp32", nn.ReLU6, None), accuracy(naive, x_test, y_test), None))
    fp32_step = {run.method.activation: run.median_step_seconds() for run in runs if run.method.quantize is None}

    print(
        "\nms/step: median CPU time of one training step (forward, loss, backward, Adam step) after the first epoch;"
        "\nthe methods took their steps in turn. x FP32: over the FP32 step of the same network."
    )
    header = f"{'method':<16} {'weights':>7} {'activations':>11} {'test acc':>8} {'ms/step':>8} {'x FP32':>7}"
    print(header)
    print("-" * len(header))
    for method, acc, seconds in rows:
        if seconds is None:
            timing = f"{'no training':>16}"
        else:
            timing = f"{seconds * 1e3:8.2f} {seconds / fp32_step[method.activation]:6.2f}x"
        print(f"{method.name:<16} {method.weights:>7} {method.activations:>11} {acc * 100:7.2f}% {timing}")


if __name__ == "__main__":
    main()
