"""LsqQuantizer: NNI 2.x's constructor and keys, learned scales as parameters, LSQ's initialisation, state_dict
round trip, export (ONNX Q/DQ included) and unwrap. Accuracy on real data: tests/test_digits_accuracy.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fakequant
from fakequant import LsqQuantizer

CONFIG = [{
    "quant_types": ["weight", "input"], "quant_bits": {"weight": 4, "input": 8}, "op_types": ["Conv2d", "Linear"],
    "quant_scheme": {"weight": "per_channel_symmetric", "input": "per_tensor_affine"},
}]  # fmt: skip


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10))  # fmt: skip


def batches(count=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(count)]


def train(net, optimizer, count=4):
    net.train()
    for x, y in batches(count):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()


def test_nni2_constructor_trains_the_scales_with_the_optimizer():
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    quantizer = LsqQuantizer(net, CONFIG, optimizer, dummy_input=torch.randn(2, 1, 8, 8))
    assert quantizer.compress() is net
    learned = quantizer.learned_parameters()
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["params"] == learned
    # per layer: the weight's per-channel scale, the input's scale and learned zero point
    assert [tuple(p.shape) for p in learned] == [(8,), (1,), (1,), (10,), (1,), (1,)]
    before = [p.detach().clone() for p in learned]
    train(net, optimizer)
    assert quantizer.steps == 4
    assert not torch.equal(before[0], learned[0]) and not torch.equal(before[1], learned[1])
    assert all(bool((learned[i] > 0).all()) for i in (0, 1, 3, 4))


def test_initial_scales_are_lsqs():
    net = model()
    weight = net[0].weight.detach().clone()
    x = torch.randn(4, 1, 8, 8)
    quantizer = LsqQuantizer(net, CONFIG, dummy_input=x)
    quantizer.compress()
    expected = 2 * weight.abs().mean(dim=(1, 2, 3)) / math.sqrt(7)
    assert torch.allclose(net[0].fakequant_weight_scale, expected)
    assert torch.allclose(net[0].fakequant_input_scale, 2 * x.abs().mean().reshape(1) / math.sqrt(255))
    zero_point = 0 - torch.round(x.min() / net[0].fakequant_input_scale)
    assert torch.equal(net[0].fakequant_input_zero_point.detach(), zero_point.clamp(0, 255).detach())


def test_activation_scale_waits_for_a_training_batch():
    net = model()
    quantizer = LsqQuantizer(net, CONFIG)
    quantizer.compress()
    x = torch.randn(2, 1, 8, 8)
    net.eval()
    assert not quantizer.layers["0"].observed["input"]
    net(x)  # eval before any training batch: the input runs in float and nothing is initialised
    assert not quantizer.layers["0"].observed["input"]
    net.train()
    net(x)
    assert quantizer.layers["0"].observed["input"]


def test_state_dict_round_trip_resumes_exactly():
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    LsqQuantizer(net, CONFIG, optimizer, dummy_input=torch.randn(2, 1, 8, 8)).compress()
    train(net, optimizer)
    state = net.state_dict()
    fresh = model()
    LsqQuantizer(fresh, CONFIG).compress()
    fresh.load_state_dict(state)
    x = torch.randn(3, 1, 8, 8)
    net.eval(), fresh.eval()
    assert torch.equal(net(x), fresh(x))


def test_export_and_onnx_match_the_eval_model(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    quantizer = LsqQuantizer(net, CONFIG, optimizer, dummy_input=torch.randn(2, 1, 8, 8))
    quantizer.compress()
    train(net, optimizer)
    calibration = quantizer.export_model(tmp_path / "m.pth", tmp_path / "c.pth", tmp_path / "m.onnx", (1, 1, 8, 8))
    assert calibration["0"]["weight_scale"].shape == (8,) and calibration["0"]["input_zero_point"].dtype == torch.int32
    assert not any("fakequant" in key for key in torch.load(tmp_path / "m.pth"))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 1, 8, 8)
    net.eval()
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(onnx_out - net(x).detach().numpy()).max() < 1e-5


def test_unwrap_removes_the_learned_parameters():
    net = model()
    names = {name for name, _ in net.named_parameters()}
    quantizer = LsqQuantizer(net, CONFIG)
    quantizer.compress()
    assert {name for name, _ in net.named_parameters() if "fakequant_" in name} == {
        "0.fakequant_weight_scale", "0.fakequant_input_scale", "0.fakequant_input_zero_point",
        "4.fakequant_weight_scale", "4.fakequant_input_scale", "4.fakequant_input_zero_point",
    }  # fmt: skip
    quantizer.unwrap()
    assert {name for name, _ in net.named_parameters()} == names


def test_bad_config_names_the_entry():
    with pytest.raises(ValueError, match=r"config_list\[0\]: unknown key 'lr'"):
        LsqQuantizer(model(), [{"quant_types": ["weight"], "op_types": ["Conv2d"], "lr": 0.1}])
    with pytest.raises(ValueError, match=r"per-tensor schemes for 'input'"):
        LsqQuantizer(model(), [{"quant_types": ["input"], "op_types": ["Conv2d"],
                                "quant_scheme": "per_channel_affine"}])  # fmt: skip


def test_functional_api_is_exported():
    assert fakequant.LsqQuantizer is LsqQuantizer
