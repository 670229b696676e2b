"""The README's speed plot: the op benchmark at one size, and the QAT training-step ratios, side by side.

    python bench/run.py --quick --interleaved --out bench/results          # writes <stamp>-quick.json
    python bench/bench_qat_step.py 40 --json bench/results/qat_step.json
    python bench/readme_plot.py bench/results/<stamp>-quick.json bench/results/qat_step.json docs/speed.png

Left: forward+backward time of each op at ``--size`` (default 2^22 fp32 elements) for each provider, as a
multiple of the copy's time in the same run (1 would be one read and one write of the tensor). Right: the time
of a QAT training step over the FP32 step, for fakequant, NNI 3.0 and the reference composition.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.providers import PROVIDERS  # noqa: E402

# The bars of the left panel: every provider but the copy (the dashed line), in the table's order.
BARS = {provider: label for provider, label in PROVIDERS.items() if provider != "copy"}
# Training-step variant -> (its label, the provider whose colour it takes on the left).
STEP_VARIANTS = {
    "qat": ("fakequant QAT\n(BN folded)", "fakequant"), "qat-nofold": ("fakequant QAT\n(no folding)", "fakequant"),
    "qat-nni": ("NNI 3.0 QAT\n(no folding)", "nni"), "qat-reference": ("QAT on PyTorch ops\n(BN folded)", "reference"),
}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ops_json", type=Path, help="a bench/run.py JSON")
    parser.add_argument("step_json", type=Path, help="a bench/bench_qat_step.py --json file")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--size", default="2^22", help="the size label of the op rows (default 2^22)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, _ = report.load_rows(args.ops_json)
    rows = [r for r in report.derive(rows) if r["size"] == args.size and r["mode"] == "fwd+bwd"]
    meta = json.loads(args.ops_json.with_suffix(".meta.json").read_text())
    ops = list(dict.fromkeys(r["op"] for r in rows))
    step = json.loads(args.step_json.read_text())

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1.1]})
    colors = {provider: f"C{i}" for i, provider in enumerate(BARS)}
    width = 0.8 / len(BARS)
    for i, (provider, label) in enumerate(BARS.items()):
        values = {r["op"]: r["x_copy"] for r in rows if r["provider"] == provider}
        xs = [k + (i - (len(BARS) - 1) / 2) * width for k, op in enumerate(ops) if op in values]
        left.bar(xs, [values[op] for op in ops if op in values], width, label=label, color=colors[provider])
    left.axhline(1.0, color="black", linestyle="--", linewidth=1, label=PROVIDERS["copy"])
    left.set_xticks(range(len(ops)), [op.replace("_", " ") for op in ops])
    left.set_yscale("log")
    left.set_ylim(0.8, 100)  # room above the bars for the legend
    left.set_ylabel("time / copy time (lower is faster)")
    left.set_title(f"forward+backward of one op, {args.size} fp32 elements", fontsize=10)
    left.legend(fontsize=8, ncol=3, loc="upper center")
    left.grid(True, axis="y", alpha=0.3)

    ratios = {r["variant"]: r["median_paired_ratio"] for r in step["rows"]}
    shown = [v for v in STEP_VARIANTS if v in ratios]
    bars = right.bar(range(len(shown)), [ratios[v] for v in shown], color=[colors[STEP_VARIANTS[v][1]] for v in shown])
    right.bar_label(bars, [f"{ratios[v]:.2f}x" for v in shown], fontsize=8)
    right.axhline(1.0, color="black", linestyle="--", linewidth=1)
    right.set_xticks(range(len(shown)), [STEP_VARIANTS[v][0] for v in shown], fontsize=7)
    right.set_ylabel("QAT step time / FP32 step time")
    right.set_title(f"training step, ResNet-style CNN, batch {step['meta']['batch']}", fontsize=10)
    right.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{meta['date']}, {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
