"""The NNI-style quantizers: seed snippets, hooks, numerics against the ops, steps, state, unwrap and export."""

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

import fakequant
from fakequant import (
    BNNQuantizer,
    DoReFaQuantizer,
    NaiveQuantizer,
    QAT_Quantizer,
    QATQuantizer,
    choose_qparams,
    fake_quant_per_channel,
    fake_quant_per_tensor,
    quant_range,
    reference,
)
from fakequant.quantizers.base import onnx_qdq_quantizer_names, quantizer_classes


class Mnist(nn.Module):
    """The model of NNI's QAT example: Conv2d/Linear weights and ReLU6 activations."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.relu1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.relu2 = nn.ReLU6()
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.relu3 = nn.ReLU6()
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


def vgg_cifar10(width=8, num_classes=10):
    """NNI's BNN example VGG_Cifar10 layout (same module indices), narrowed for a test."""
    w = width
    features = nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.Hardtanh(inplace=True),
        nn.Conv2d(w, w, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(w), nn.Hardtanh(inplace=True),
        nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.Hardtanh(inplace=True),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(2 * w),
        nn.Hardtanh(inplace=True),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.Hardtanh(inplace=True),
        nn.Conv2d(4 * w, 4 * w, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(4 * w),
        nn.Hardtanh(inplace=True),
    )
    classifier = nn.Sequential(
        nn.Linear(4 * w * 16, 32, bias=False), nn.BatchNorm1d(32), nn.Hardtanh(inplace=True),
        nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.Hardtanh(inplace=True),
        nn.Linear(32, num_classes), nn.BatchNorm1d(num_classes, affine=False),
    )

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.classifier = features, classifier

        def forward(self, x):
            return self.classifier(self.features(x).flatten(1))

    return VGG()


QAT_SEED_CONFIG = [{
    'quant_types': ['weight'],
    'quant_bits': {
        'weight': 8,
    },
    'op_types': ['Conv2d', 'Linear']
}, {
    'quant_types': ['output'],
    'quant_bits': 8,
    'quant_start_step': 7000,
    'op_types': ['ReLU6']
}]

BNN_SEED_CONFIG = [{
    'quant_bits': 1,
    'quant_types': ['weight'],
    'op_types': ['Conv2d', 'Linear'],
    'op_names': ['features.0', 'features.3', 'features.7', 'features.10', 'features.14', 'features.17',
                 'classifier.0', 'classifier.3']
}, {
    'quant_bits': 1,
    'quant_types': ['output'],
    'op_types': ['Hardtanh'],
    'op_names': ['features.6', 'features.9', 'features.13', 'features.16', 'features.20', 'classifier.2',
                 'classifier.5']
}]

W8_OUT8 = [
    {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU6"]},
]


def images(n=8, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.name()))
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------
# The seeds' snippets, unchanged apart from the import
# ------------------------------------------------------------------------------------------------


def test_seed_qat_snippet():
    torch.manual_seed(0)
    model = Mnist()
    config_list = [{
        'quant_types': ['weight'],
        'quant_bits': {
            'weight': 8,
        },  # you can just use `int` here because all `quan_types` share same bits length
        'op_types': ['Conv2d', 'Linear']
    }, {
        'quant_types': ['output'],
        'quant_bits': 8,
        'quant_start_step': 7000,
        'op_types': ['ReLU6']
    }]
    quantizer = QAT_Quantizer(model, config_list)
    quantizer.compress()
    assert set(quantizer.layers) == {"conv1", "conv2", "fc1", "fc2", "relu1", "relu2", "relu3"}
    assert model(images()).shape == (8, 10)
    assert quantizer.layers["relu1"].observed["output"]  # tracked before quant_start_step


def test_seed_dorefa_snippets():
    model = Mnist()
    config_list = [{'q_bits': 8, 'op_types': 'default'}]
    quantizer = DoReFaQuantizer(model, config_list)
    quantizer.compress()
    assert set(quantizer.layers) == {"conv1", "conv2", "fc1", "fc2"}
    model = Mnist()
    config_list = [{
        'quant_types': ['weight'],
        'quant_bits': 8,
        'op_types': 'default'
    }]
    quantizer = DoReFaQuantizer(model, config_list)
    quantizer.compress()
    assert model(images()).shape == (8, 10)


def test_seed_naive_snippet():
    model = Mnist()
    model = NaiveQuantizer(model).compress()
    assert isinstance(model, Mnist) and model(images()).shape == (8, 10)


def test_seed_bnn_snippet():
    model = vgg_cifar10()
    configure_list = BNN_SEED_CONFIG
    quantizer = BNNQuantizer(model, configure_list)
    model = quantizer.compress()
    assert len(quantizer.layers) == 15
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    assert set(model.features[0].weight.unique().tolist()) == {-1.0, 1.0}


def test_qatquantizer_alias_and_compress_returns_same_model():
    assert QATQuantizer is QAT_Quantizer
    model = Mnist()
    assert QAT_Quantizer(model, W8_OUT8).compress() is model


# ------------------------------------------------------------------------------------------------
# Hooks and parametrization, not monkey-patching; unwrap restores a plain float model
# ------------------------------------------------------------------------------------------------


def test_attached_by_hooks_and_parametrization_not_by_replacing_forward():
    model = Mnist()
    QAT_Quantizer(model, W8_OUT8 + [{"quant_types": ["input"], "op_names": ["fc2"]}]).compress()
    for module in model.modules():
        assert "forward" not in vars(module)
    assert parametrize.is_parametrized(model.conv1, "weight")
    assert len(model.relu1._forward_hooks) == 1 and len(model.fc2._forward_pre_hooks) == 1


def test_unwrap_restores_the_float_model_exactly():
    torch.manual_seed(0)
    model = Mnist()
    reference = copy.deepcopy(model)
    original_weight = model.conv1.weight
    quantizer = QAT_Quantizer(model, W8_OUT8 + [{"quant_types": ["input", "output"], "op_names": ["fc2"]}])
    quantizer.compress()
    model(images())
    x = images(seed=1)
    assert not torch.equal(model(x), reference(x))
    quantizer.unwrap()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert model.conv1.weight is original_weight and type(model.conv1) is nn.Conv2d
    assert model.state_dict().keys() == reference.state_dict().keys()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not parametrize.is_parametrized(module)
        assert not any(name.startswith("fakequant_") for name in module._buffers)
    assert not model._load_state_dict_post_hooks
    QAT_Quantizer(model, W8_OUT8).compress()  # quantizable again


def test_unwrap_removes_optimizer_hook():
    model = Mnist()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    quantizer = QAT_Quantizer(model, W8_OUT8, optimizer)
    quantizer.compress()
    optimizer.step()
    assert quantizer.steps == 1
    quantizer.unwrap()
    optimizer.step()
    assert quantizer.steps == 1


def test_optimizer_built_before_compress_updates_the_master_weight():
    torch.manual_seed(0)
    model = Mnist()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    QAT_Quantizer(model, W8_OUT8).compress()
    before = model.conv1.parametrizations.weight.original.detach().clone()
    model(images()).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model.conv1.parametrizations.weight.original, before)


def test_compress_twice_is_an_error():
    quantizer = QAT_Quantizer(Mnist(), W8_OUT8)
    quantizer.compress()
    with pytest.raises(ValueError, match="compress\\(\\) was already called"):
        quantizer.compress()


def test_every_quantization_goes_through_the_fakequant_ops():
    model = Mnist()
    quantizer = QAT_Quantizer(model, W8_OUT8)
    quantizer.compress()
    with OpRecorder() as recorder:
        model(images())
    assert recorder.ops.count("fakequant::fake_quant_per_tensor") == 4 + 3
    model = vgg_cifar10()
    BNNQuantizer(model, BNN_SEED_CONFIG).compress()
    with OpRecorder() as recorder:
        model(torch.randn(2, 3, 32, 32))
    assert recorder.ops.count("fakequant::binarize") == 15


# ------------------------------------------------------------------------------------------------
# QAT numerics
# ------------------------------------------------------------------------------------------------


def test_qat_weight_is_fake_quantized_from_its_current_range_per_tensor():
    model = Mnist()
    QAT_Quantizer(model, [{"quant_types": ["weight"], "op_types": ["Conv2d"]}]).compress()
    w = model.conv1.parametrizations.weight.original.detach()
    qmin, qmax = quant_range(8)
    scale, zp = choose_qparams(w.min(), w.max(), qmin, qmax, symmetric=True)
    expected = fake_quant_per_tensor(w, scale, zp, qmin, qmax)
    torch.testing.assert_close(model.conv1.weight, expected, rtol=0, atol=0)
    assert len(expected.unique()) > 10 and not torch.equal(expected, w)
    x = images()
    torch.testing.assert_close(model.conv1(x), nn.functional.conv2d(x, expected, model.conv1.bias), rtol=0, atol=0)
    torch.testing.assert_close(model.conv1.fakequant_weight_scale, scale, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["per_channel_symmetric", "per_channel_affine"])
@pytest.mark.parametrize("dtype", ["int", "uint"])
def test_qat_weight_per_channel(scheme, dtype):
    model = Mnist()
    QAT_Quantizer(model, [{"quant_types": ["weight"], "quant_bits": 4, "quant_scheme": scheme, "quant_dtype": dtype,
                           "op_types": ["Conv2d"]}]).compress()
    w = model.conv2.parametrizations.weight.original.detach()
    qmin, qmax = quant_range(4, signed=dtype == "int")
    low, high = torch.aminmax(w.flatten(1), dim=1)
    scale, zp = choose_qparams(low, high, qmin, qmax, symmetric=scheme.endswith("symmetric"))
    expected = fake_quant_per_channel(w, scale, zp, 0, qmin, qmax)
    torch.testing.assert_close(model.conv2.weight, expected, rtol=0, atol=0)
    assert model.conv2.fakequant_weight_scale.shape == (8,)


def test_qat_weight_gradient_is_the_straight_through_estimator():
    model = nn.Sequential(nn.Linear(6, 3))
    with torch.no_grad():
        # Symmetric 3-bit: scale = max|w| / 3.5 puts the largest weight at a near-tie (level ~3.5, range
        # [-4, 3]) whose side depends on the fp32 reciprocal: the reference's mask says what is clipped.
        model[0].weight.copy_(torch.linspace(-0.5, 1.0, 18).reshape(3, 6))
    QAT_Quantizer(model, [{"quant_types": ["weight"], "quant_bits": 3, "op_types": ["Linear"]}]).compress()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    model(x).sum().backward()
    layer = model[0]
    master = layer.parametrizations.weight.original
    _, in_range = reference.fake_quant_per_tensor_forward(
        master.detach(), layer.fakequant_weight_scale, layer.fakequant_weight_zero_point, -4, 3
    )
    torch.testing.assert_close(master.grad, (torch.ones(3, 5) @ x) * in_range, rtol=0, atol=0)


def test_qat_activation_ema_first_observation_initialises_then_decays_0_99():
    model = Mnist()
    quantizer = QAT_Quantizer(model, W8_OUT8)
    quantizer.compress()
    relu = model.relu1
    model(images(seed=0))
    with torch.no_grad():
        out0 = nn.functional.relu6(nn.functional.conv2d(images(seed=0), model.conv1.weight, model.conv1.bias))
        out1 = nn.functional.relu6(nn.functional.conv2d(images(seed=1), model.conv1.weight, model.conv1.bias))
    torch.testing.assert_close(relu.fakequant_output_range, torch.stack(torch.aminmax(out0)), rtol=0, atol=0)
    model(images(seed=1))
    first = torch.stack(torch.aminmax(out0))
    expected = 0.99 * first + 0.01 * torch.stack(torch.aminmax(out1))
    torch.testing.assert_close(relu.fakequant_output_range, expected, rtol=1e-6, atol=1e-7)
    scale, zp = choose_qparams(relu.fakequant_output_range[0], relu.fakequant_output_range[1], 0, 255, False)
    torch.testing.assert_close(relu.fakequant_output_scale, scale, rtol=0, atol=0)
    torch.testing.assert_close(relu.fakequant_output_zero_point, zp, rtol=0, atol=0)


def test_qat_output_is_fake_quantized_with_the_tracked_scale():
    model = Mnist()
    QAT_Quantizer(model, W8_OUT8).compress()
    model(images(seed=0))
    model.eval()
    x = images(seed=3)
    with torch.no_grad():
        pre = nn.functional.relu6(nn.functional.conv2d(x, model.conv1.weight, model.conv1.bias))
        expected = fake_quant_per_tensor(pre, model.relu1.fakequant_output_scale,
                                         model.relu1.fakequant_output_zero_point, 0, 255)
        torch.testing.assert_close(model.relu1(model.conv1(x)), expected, rtol=0, atol=0)


def test_qat_eval_mode_does_not_move_ranges():
    model = Mnist()
    QAT_Quantizer(model, W8_OUT8).compress()
    model(images(seed=0))
    tracked = model.relu1.fakequant_output_range.clone()
    model.eval()
    model(images(seed=1) * 10)
    torch.testing.assert_close(model.relu1.fakequant_output_range, tracked, rtol=0, atol=0)


def test_qat_eval_before_any_observation_runs_float_activations():
    model = Mnist().eval()
    reference = copy.deepcopy(model)
    quantizer = QAT_Quantizer(model, [{"quant_types": ["output"], "op_types": ["ReLU6"]}])
    quantizer.compress()
    x = images()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert not quantizer.layers["relu1"].observed["output"]
    model.train()
    model(x)
    model.eval()
    assert not torch.equal(model(x), reference(x))


def test_quant_start_step_tracks_ranges_but_quantizes_only_from_that_step():
    torch.manual_seed(0)
    model = Mnist()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # steps count, weights stay put
    config = [{**entry, "quant_start_step": 2} for entry in W8_OUT8]
    quantizer = QAT_Quantizer(model, config, optimizer)
    quantizer.compress()
    x = images()
    for step in range(3):
        assert quantizer.steps == step
        out = model(x)
        if step < 2:
            torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
        else:
            assert not torch.equal(out, reference(x))
        assert quantizer.layers["relu2"].observed["output"]
        optimizer.step()
    assert int(model.fakequant_step) == 3


def test_step_without_optimizer_advances_the_buffer():
    model = Mnist()
    quantizer = QAT_Quantizer(model, W8_OUT8)
    quantizer.compress()
    quantizer.step()
    quantizer.step()
    assert quantizer.steps == 2 and int(model.fakequant_step) == 2


def test_input_quantization_by_pre_hook():
    model = nn.Sequential(nn.Linear(4, 4))
    QAT_Quantizer(model, [{"quant_types": ["input"], "quant_bits": 4, "op_types": ["Linear"]}]).compress()
    x = torch.randn(3, 4)
    model(x)
    scale, zp = model[0].fakequant_input_scale, model[0].fakequant_input_zero_point
    expected = nn.functional.linear(fake_quant_per_tensor(x, scale, zp, 0, 15), model[0].weight, model[0].bias)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Naive, DoReFa, BNN
# ------------------------------------------------------------------------------------------------


def test_naive_is_8bit_symmetric_narrow_with_round_half_even():
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        # scale = 1.27 / 127 = 0.01: 0.025 and 0.035 are ties (2.5 and 3.5 steps)
        model[0].weight.copy_(torch.tensor([[1.27, 0.025, -0.035, -0.5]]))
    NaiveQuantizer(model).compress()
    scale = torch.tensor(1.27) / 127
    expected = fake_quant_per_tensor(torch.tensor([[1.27, 0.025, -0.035, -0.5]]), scale,
                                     torch.tensor(0, dtype=torch.int32), -127, 127)
    torch.testing.assert_close(model[0].weight, expected, rtol=0, atol=0)
    torch.testing.assert_close(model[0].fakequant_weight_scale, scale, rtol=0, atol=0)


def dorefa_quant_k(v, bits):
    n = (1 << bits) - 1
    return torch.round(v * n) / n


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dorefa_weight_formula(bits):
    model = nn.Sequential(nn.Conv2d(2, 3, 3))
    DoReFaQuantizer(model, [{"q_bits": bits, "op_types": "default"}]).compress()
    w = model[0].parametrizations.weight.original.detach()
    t = torch.tanh(w)
    expected = 2 * dorefa_quant_k(t / (2 * t.abs().max()) + 0.5, bits) - 1
    torch.testing.assert_close(model[0].weight, expected, rtol=0, atol=2e-7)
    assert len(model[0].weight.unique()) <= 1 << bits


def test_dorefa_activation_formula_and_gradient_of_clamp():
    model = nn.Sequential(nn.Linear(4, 16))
    DoReFaQuantizer(model, [{"quant_types": ["output"], "quant_bits": 2, "op_types": ["Linear"]}]).compress()
    x = torch.randn(8, 4) * 3
    y = model(x)
    with torch.no_grad():
        pre = nn.functional.linear(x, model[0].weight, model[0].bias)
    torch.testing.assert_close(y, dorefa_quant_k(pre.clamp(0, 1), 2), rtol=0, atol=2e-7)


def capture_output_grad(module, store, key):
    def on_grad(grad):
        store[key] = grad.clone()

    def hook(module, args, out):
        out.register_hook(on_grad)

    return module.register_forward_hook(hook)


def test_dorefa_gradient_quantization_off_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 1))
    DoReFaQuantizer(model, [{"q_bits": 8, "op_types": "default"}]).compress()
    grads = {}
    capture_output_grad(model[0], grads, "out0")
    model(torch.randn(4, 5)).pow(2).sum().backward()
    # the float gradient: each sample's 6 values are distinct
    assert all(len(row.unique()) == 6 for row in grads["out0"])


def test_dorefa_gradient_formula_with_stochastic_noise():
    bits = 2
    model = nn.Sequential(nn.Linear(5, 6))
    quantizer = DoReFaQuantizer(model, [{"q_bits": 8, "op_types": "default"}], gradient_bits=bits,
                                generator=torch.Generator().manual_seed(3))
    quantizer.compress()
    grad = torch.randn(4, 6)
    out = quantizer.quantize_gradient(quantizer.layers["0"], grad)
    noise = torch.rand(grad.shape, generator=torch.Generator().manual_seed(3)) - 0.5
    peak = grad.abs().amax(dim=1, keepdim=True)
    unit = (grad / (2 * peak) + 0.5 + noise / 3).clamp(0, 1)
    expected = 2 * peak * (dorefa_quant_k(unit, bits) - 0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert all(len(row.unique()) <= 1 << bits for row in out)


def test_dorefa_gradient_quantized_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Linear(16, 1))
    DoReFaQuantizer(model, [{"q_bits": 8, "op_types": "default"}], gradient_bits=2).compress()
    grads = {}
    capture_output_grad(model[0], grads, "out0")  # registered after the quantizer's hook: sees its result
    model(torch.randn(4, 5)).pow(2).sum().backward()
    assert all(len(row.unique()) <= 4 for row in grads["out0"])
    assert model[0].parametrizations.weight.original.grad.abs().sum() > 0


def test_dorefa_gradient_bits_validated():
    with pytest.raises(ValueError, match="gradient_bits must be None or an int from 1 to 16, got 0"):
        DoReFaQuantizer(Mnist(), [{"q_bits": 8, "op_types": "default"}], gradient_bits=0)


def test_bnn_weights_binarized_with_identity_ste_and_clamped_after_steps():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Hardtanh())
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.2, 0.0, 3.0], [-2.0, 0.1, 0.9, -0.9], [0, 0, 0, -1e-3]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    BNNQuantizer(model, [{"quant_types": ["weight"], "op_types": ["Linear"]},
                         {"quant_types": ["output"], "op_types": ["Hardtanh"]}], optimizer).compress()
    assert torch.equal(model[0].weight, torch.tensor([[1.0, -1, 1, 1], [-1, 1, 1, -1], [1, 1, 1, -1]]))
    x = torch.randn(2, 4)
    model(x).sum().backward()
    pre = nn.functional.linear(x, model[0].weight.detach())
    # identity STE on the weight: the gradient reaches the weights of magnitude 3 and 2 too
    expected = (pre.abs() < 1).float().t() @ x  # hardtanh's own gradient; |hardtanh| <= 1 passes the STE
    torch.testing.assert_close(model[0].parametrizations.weight.original.grad, expected)
    optimizer.step()
    master = model[0].parametrizations.weight.original
    assert master.abs().max() == 1.0 and master[0, 3] == 1.0 and master[1, 0] == -1.0


def test_bnn_activations_clipped_ste():
    model = nn.Sequential(nn.Identity())
    BNNQuantizer(model, [{"quant_types": ["output"], "op_types": ["Identity"]}]).compress()
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5], requires_grad=True)
    y = model(x)
    assert torch.equal(y, torch.tensor([-1.0, -1, 1, 1, 1]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 0]))


# ------------------------------------------------------------------------------------------------
# State: buffers in the state_dict, round trip, resume
# ------------------------------------------------------------------------------------------------


def make_qat(seed=0, optimizer=True, config=W8_OUT8):
    torch.manual_seed(seed)
    model = Mnist()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    quantizer = QAT_Quantizer(model, config, opt if optimizer else None)
    quantizer.compress()
    return model, opt, quantizer


def batches(n, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(n)]


def train(model, opt, data):
    losses = []
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_state_dict_holds_every_scale_range_and_the_step():
    model, opt, _ = make_qat()
    keys = set(model.state_dict())
    assert {"fakequant_step", "conv1.fakequant_weight_scale", "conv1.fakequant_weight_zero_point",
            "relu1.fakequant_output_range", "relu1.fakequant_output_scale", "relu1.fakequant_output_zero_point",
            "relu1.fakequant_output_observed"} <= keys
    assert model.conv1.fakequant_weight_scale.dtype == torch.float32
    assert model.relu1.fakequant_output_zero_point.dtype == torch.int32


def test_state_dict_round_trip_outputs_bit_identical(tmp_path):
    config = [{**W8_OUT8[0], "quant_scheme": "per_channel_affine"}, {**W8_OUT8[1], "quant_start_step": 2}]
    model, opt, quantizer = make_qat(config=config)
    train(model, opt, batches(3))
    torch.save(model.state_dict(), tmp_path / "state.pth")
    model.eval()
    x = images(seed=5)
    expected = model(x)

    rebuilt, _, rebuilt_quantizer = make_qat(seed=123, config=config)
    assert rebuilt_quantizer.steps == 0
    rebuilt.load_state_dict(torch.load(tmp_path / "state.pth"))
    assert rebuilt_quantizer.steps == 3 and rebuilt_quantizer.layers["relu1"].observed["output"]
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), expected, rtol=0, atol=0)


def test_resume_mid_training_continues_exactly(tmp_path):
    config = [W8_OUT8[0], {**W8_OUT8[1], "quant_start_step": 3}]
    data = batches(8)
    model, opt, _ = make_qat(config=config)
    uninterrupted = train(model, opt, data)

    model, opt, _ = make_qat(config=config)
    first = train(model, opt, data[:4])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pth")
    model, opt, quantizer = make_qat(seed=7, config=config)
    checkpoint = torch.load(tmp_path / "ckpt.pth")
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    second = train(model, opt, data[4:])
    assert first + second == uninterrupted
    assert quantizer.steps == 8


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_checkpoint_with_a_non_finite_range_is_refused_before_loading(bad):
    """A range saved after a fault (a non-finite batch) would break every later step: load_state_dict names the
    buffer and copies nothing."""
    model, opt, _ = make_qat()
    train(model, opt, batches(2))
    state = model.state_dict()
    state["relu2.fakequant_output_range"] = state["relu2.fakequant_output_range"].clone()
    state["relu2.fakequant_output_range"][1] = bad
    fresh, _, _ = make_qat(seed=7)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"QAT_Quantizer: the checkpoint's relu2.fakequant_output_range holds "
                                         r"non-finite values \((nan|inf)\)"):  # fmt: skip
        fresh.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    del state["relu2.fakequant_output_range"]
    fresh.load_state_dict(state, strict=False)  # without the bad entry the rest loads


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def test_export_model_writes_float_weights_and_calibration(tmp_path):
    model, opt, quantizer = make_qat()
    train(model, opt, batches(2))
    calibration = quantizer.export_model(tmp_path / "model.pth", tmp_path / "calibration.pth")
    assert torch.load(tmp_path / "calibration.pth", weights_only=False).keys() == calibration.keys()
    assert set(calibration) == {"conv1", "conv2", "fc1", "fc2", "relu1", "relu2", "relu3"}
    conv = calibration["conv1"]
    master = model.conv1.parametrizations.weight.original.detach()
    scale, zp = choose_qparams(master.min(), master.max(), -128, 127, True)
    assert conv["weight_bits"] == 8 and (conv["weight_quant_min"], conv["weight_quant_max"]) == (-128, 127)
    torch.testing.assert_close(conv["weight_scale"], scale, rtol=0, atol=0)
    torch.testing.assert_close(conv["weight_zero_point"], zp, rtol=0, atol=0)
    relu = calibration["relu2"]
    assert relu["output_bits"] == 8
    assert relu["tracked_min_output"] == float(model.relu2.fakequant_output_range[0])
    assert relu["tracked_max_output"] == float(model.relu2.fakequant_output_range[1]) > 0
    torch.testing.assert_close(relu["output_scale"], model.relu2.fakequant_output_scale, rtol=0, atol=0)

    saved = torch.load(tmp_path / "model.pth")
    quantizer.unwrap()
    unwrapped = model.state_dict()
    assert saved.keys() == unwrapped.keys()
    for key in saved:
        assert torch.equal(saved[key], unwrapped[key])


def test_export_calibration_of_dorefa_and_bnn(tmp_path):
    model = Mnist()
    quantizer = DoReFaQuantizer(model, [{"q_bits": 4, "op_types": "default"},
                                        {"quant_types": ["output"], "quant_bits": 2, "op_types": ["ReLU6"]}])
    quantizer.compress()
    calibration = quantizer.export_model(tmp_path / "m.pth")
    assert calibration["fc1"]["weight_bits"] == 4 and calibration["relu1"]["tracked_max_output"] == 1.0
    model = vgg_cifar10()
    quantizer = BNNQuantizer(model, BNN_SEED_CONFIG)
    quantizer.compress()
    calibration = quantizer.export_model(tmp_path / "m.pth")
    assert calibration["features.0"]["weight_bits"] == 1
    assert "features.0.weight" in torch.load(tmp_path / "m.pth")


def test_training_is_bit_identical_on_every_backend(backend):
    config = [{**W8_OUT8[0], "quant_scheme": "per_channel_affine"}, W8_OUT8[1],
              {"quant_types": ["input"], "quant_bits": 6, "op_names": ["fc2"]}]
    data = batches(3)
    model, opt, _ = make_qat(config=config)
    losses = train(model, opt, data)
    state = model.state_dict()
    fakequant.set_backend("reference")
    model, opt, _ = make_qat(config=config)
    reference_losses = train(model, opt, data)
    fakequant.set_backend(backend)
    assert losses == reference_losses
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_state_is_created_on_the_model_device():
    # the meta device stands in for a GPU here: every buffer must follow the model, or the ops would get
    # a CPU scale for a device tensor
    model = Mnist().to("meta")
    quantizer = QAT_Quantizer(model, W8_OUT8 + [{"quant_types": ["input"], "op_names": ["fc2"]}])
    quantizer.compress()
    assert {value.device.type for value in model.state_dict().values()} == {"meta"}
    assert model(torch.empty(2, 1, 8, 8, device="meta")).shape == (2, 10)


@pytest.mark.parametrize("quantizer_class", [QAT_Quantizer, DoReFaQuantizer])
def test_half_model_trains_and_evaluates(quantizer_class):
    # model.half() casts the float buffers (scales, ranges) as well; the ops still get fp32 scales
    config = W8_OUT8 if quantizer_class is QAT_Quantizer else [
        {"q_bits": 4, "op_types": "default"}, {"quant_types": ["output"], "quant_bits": 4, "op_types": ["ReLU6"]}]
    model = Mnist()
    quantizer_class(model, config).compress()
    model.half()
    x = images().half()
    out = model(x)
    out.float().sum().backward()
    assert out.dtype == torch.float16 and model.conv1.parametrizations.weight.original.grad is not None
    model.eval()
    assert torch.isfinite(model(x)).all()


# ---------------------------------------------------------------------------------------------
# Quantized ReLU outputs: the fused ReLU + fake quant path
# ---------------------------------------------------------------------------------------------


class _NotFusedReLU(nn.ReLU):
    """An nn.ReLU subclass: the quantizer's fused path applies to nn.ReLU itself only, so this one takes the
    plain path (quantize the module's output)."""


def _relu_net(relu: type[nn.Module]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), relu(), nn.Conv2d(8, 4, 3), relu(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def _relu_step_results(relu: type[nn.Module], steps: int = 3):
    model = _relu_net(relu)
    config = [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
              {"quant_types": ["output"], "quant_bits": 8, "op_types": [relu.__name__]}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fakequant.QAT_Quantizer(model, config, optimizer, bn_folding=False).compress()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    outputs, grads = [], []
    for _ in range(steps):
        out = model(x)
        optimizer.zero_grad()
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    model.eval()
    return outputs + [model(x).detach()], grads, model


def test_relu_output_fused_path_equals_plain_path():
    fused_outputs, fused_grads, _ = _relu_step_results(nn.ReLU)
    plain_outputs, plain_grads, _ = _relu_step_results(_NotFusedReLU)
    for a, b in zip(fused_outputs, plain_outputs, strict=True):
        assert torch.equal(a, b)
    for step_a, step_b in zip(fused_grads, plain_grads, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            assert torch.equal(a, b)


def test_relu_output_fused_path_drops_relu_from_the_graph():
    model = _relu_step_results(nn.ReLU, steps=1)[2].train()
    out = model[2](model[1](model[0](torch.randn(2, 3, 8, 8))))
    assert out.grad_fn is not None and "Relu" not in type(out.grad_fn).__name__
    assert "Relu" not in str([type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None])


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops run on non-empty tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.numel() > 0 for t in tensors):
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_relu_output_fused_path_skips_the_relu_itself():
    """The quantized output of an nn.ReLU comes from its input; the ReLU runs on an empty placeholder only."""
    model = _relu_step_results(nn.ReLU, steps=1)[2]
    x = torch.randn(2, 3, 8, 8)
    for training in (True, False):
        model.train(training)
        with _OpCounter() as counter:
            model(x)
        assert not {"relu", "clamp_min", "threshold"} & set(counter.ops), counter.ops
        assert "fake_quant_per_tensor" in counter.ops


def test_relu_output_range_is_that_of_relu_of_the_input():
    model = _relu_step_results(nn.ReLU, steps=1)[2].train()
    relu = model[2]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        relu_input = model[1](model[0](x))
        before = relu.fakequant_output_range.clone()
        model(x)
    batch = torch.relu(torch.stack(torch.aminmax(relu_input)))
    torch.testing.assert_close(relu.fakequant_output_range, before + (batch - before) * 0.01, rtol=0, atol=0)


def test_relu_with_other_hooks_sees_the_real_tensors():
    """Another hook on the ReLU turns the placeholder off: it sees the real input and the quantized output."""
    fused = _relu_step_results(nn.ReLU, steps=1)[2]
    watched = _relu_step_results(nn.ReLU, steps=1)[2]
    seen = {}
    watched[2].register_forward_pre_hook(lambda module, args: seen.update(input=args[0]))
    watched[2].register_forward_hook(lambda module, args, output: seen.update(output=output))
    x = torch.randn(2, 3, 8, 8)
    for model in (fused, watched):
        model.train()
    out_fused, out_watched = fused(x), watched(x)
    assert torch.equal(out_fused, out_watched)
    assert seen["input"].shape == (2, 8, 6, 6) and (seen["input"] < 0).any()  # the ReLU's real input
    relu = watched[2]
    levels = seen["output"] / relu.fakequant_output_scale + relu.fakequant_output_zero_point
    assert (seen["output"] >= 0).all() and (levels - levels.round()).abs().max() < 1e-3  # the quantized output


def test_relu_with_a_backward_hook_keeps_its_tensors():
    fused = _relu_step_results(nn.ReLU, steps=1)[2].train()
    watched = _relu_step_results(nn.ReLU, steps=1)[2].train()
    grads = []
    watched[2].register_full_backward_hook(lambda module, grad_input, grad_output: grads.append(grad_input[0]))
    x = torch.randn(2, 3, 8, 8)
    out_fused, out_watched = fused(x), watched(x)
    assert torch.equal(out_fused, out_watched)
    out_watched.square().sum().backward()
    assert len(grads) == 1 and grads[0].shape == (2, 8, 6, 6)


def test_relu_before_quant_start_step_is_the_float_relu():
    model = _relu_net(nn.ReLU)
    reference_model = _relu_net(nn.ReLU)
    config = [{"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"], "quant_start_step": 5}]
    fakequant.QAT_Quantizer(model, config, bn_folding=False).compress()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = model.train()(x)
    expected = reference_model.train()(x)
    assert torch.equal(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    assert torch.equal(grad, expected_grad)
    assert model[2].fakequant_output_observed.item() == 1


# ------------------------------------------------------------------------------------------------
# The subclass contract: abstract public hooks, exportability declared by the class
# ------------------------------------------------------------------------------------------------


class _GridQuantizer(fakequant.Quantizer):
    """A quantizer written from the public hooks alone: weights on the fixed grid k / 16, activations in float."""

    rules = dataclasses.replace(QAT_Quantizer.rules, name="_GridQuantizer")

    def init_layer_state(self, layer):
        layer.add_buffer("weight_scale", torch.tensor(1 / 16))
        layer.add_buffer("weight_zero_point", torch.tensor(0, dtype=torch.int32))

    def quantize_weight(self, layer, weight):
        return fake_quant_per_tensor(weight, layer.buffer("weight_scale"), layer.buffer("weight_zero_point"), -128,
                                     127)

    def quantize_input(self, layer, x):
        return x

    def quantize_output(self, layer, y):
        return y

    def layer_calibration(self, layer):
        return {"weight_scale": layer.buffer("weight_scale").clone()}


def test_quantizer_hooks_are_abstract():
    config = [{"quant_types": ["weight"], "op_types": ["Linear"]}]
    with pytest.raises(TypeError, match="abstract"):
        fakequant.Quantizer(nn.Linear(4, 4), config)

    class WithoutCalibration(_GridQuantizer):
        layer_calibration = fakequant.Quantizer.layer_calibration  # the abstract hook again

    with pytest.raises(TypeError, match="layer_calibration"):
        WithoutCalibration(nn.Linear(4, 4), config)
    assert fakequant.Quantizer.__abstractmethods__ == {
        "init_layer_state", "quantize_weight", "quantize_input", "quantize_output", "layer_calibration"
    }


def test_a_quantizer_made_of_the_public_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    weight = model[0].weight.detach().clone()
    quantizer = _GridQuantizer(model, [{"quant_types": ["weight"], "op_types": ["Linear"]}])
    quantizer.compress()
    assert torch.equal(model[0].weight, torch.round(weight * 16).clamp(-128, 127) / 16)
    assert "0.fakequant_weight_scale" in model.state_dict()
    calibration = quantizer.calibration()
    assert list(calibration) == ["0"] and torch.equal(calibration["0"]["weight_scale"], torch.tensor(1 / 16))
    assert not _GridQuantizer.exports_onnx_qdq
    with pytest.raises(ValueError, match=r"layer '0' weight: _GridQuantizer has no QuantizeLinear/DequantizeLinear "
                                         r"export; allowed: LsqQuantizer, NaiveQuantizer and QAT_Quantizer$"):
        quantizer.onnx_qdq(quantizer.layers["0"], "weight")


def test_exportability_is_declared_by_the_class():
    classes = quantizer_classes()
    assert [cls.__name__ for cls in classes] == [
        "BNNQuantizer", "DoReFaQuantizer", "LsqQuantizer", "NaiveQuantizer", "QAT_Quantizer"
    ]
    assert {cls.__name__ for cls in classes if cls.exports_onnx_qdq} == {"LsqQuantizer", "NaiveQuantizer",
                                                                          "QAT_Quantizer"}
    assert onnx_qdq_quantizer_names() == "LsqQuantizer, NaiveQuantizer and QAT_Quantizer"
    with pytest.raises(TypeError, match="sets exports_onnx_qdq = True but does not override onnx_qdq"):

        class Exporting(_GridQuantizer):
            exports_onnx_qdq = True
