"""A QAT run survives a non-finite batch (issue 22): the fault scenario on every backend, in fp32 and under bf16
autocast. One batch holds an inf, a later one a NaN (what an fp16 overflow or a bad sample gives); the loop skips
a step whose loss is not finite, as torch.amp.GradScaler does; the run goes on with finite ranges and scales
(docs/numerics.md, Non-finite inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fakequant import QAT_Quantizer

CONFIG = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]


class SmallCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def batches(n: int, faults: dict[int, float]):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randn(8, 1, 8, 8, generator=g)
        if i in faults:
            x[3, 0, 4, 4] = faults[i]
        out.append((x, torch.randint(0, 10, (8,), generator=g)))
    return out


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "fakequant_" in k and v.is_floating_point()}


def train(data, autocast: bool):
    torch.manual_seed(0)
    model = SmallCnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    QAT_Quantizer(model, CONFIG, opt).compress()
    losses, skipped = [], 0
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            skipped += 1  # GradScaler's rule: a non-finite step is skipped, the run goes on
            opt.zero_grad()
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses, skipped


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_non_finite_batch_does_not_end_the_run(backend, autocast):
    data = batches(12, {4: float("inf"), 8: float("nan")})
    model, losses, skipped = train(data, autocast)
    # The inf is fake-quantized to the end of the input's range, so its step trains; the NaN stays NaN, so its
    # loss is NaN (the fault stays visible) and the step is skipped.
    assert skipped == 1
    assert len(losses) == 11 and all(torch.isfinite(torch.tensor(losses)))
    state = quantizer_state(model)
    assert state and all(bool(v.isfinite().all()) for v in state.values()), {
        k: v for k, v in state.items() if not bool(v.isfinite().all())}
    # The faulty batches' finite values were observed: their ranges are those of the clean batches' run plus
    # two finite observations, within the clean run's spread of ranges.
    clean_model, clean_losses, _ = train([b for i, b in enumerate(data) if i not in (4, 8)], autocast)
    assert abs(losses[-1] - clean_losses[-1]) < 0.5
