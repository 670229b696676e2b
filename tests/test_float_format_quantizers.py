"""Float formats in config_list (quant_dtype 'fp8_e4m3' ... 'nvfp4'): QAT_Quantizer's weights and activations against
the public ops applied by hand, training steps, the config errors, state_dict round trip, calibration of the
per-tensor scales, LsqQuantizer's learned FP8 scales, and the ONNX export's refusal."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fakequant
from fakequant import FloatSpec, LsqQuantizer, PerBlock, PerChannel, PerTensor, QAT_Quantizer, reference
from fakequant.formats import ELEMENT_FORMATS

# quant_dtype -> (op, element format, default block size): what the config value means, written out independently
# of fakequant.qparams.FLOAT_QUANT_DTYPES so that a wrong table there fails here.
FORMATS = {
    "fp8_e4m3": ("fp8", "e4m3", 0),
    "fp8_e5m2": ("fp8", "e5m2", 0),
    "mxfp8_e4m3": ("mx", "e4m3", 32),
    "mxfp8_e5m2": ("mx", "e5m2", 32),
    "mxfp6_e3m2": ("mx", "e3m2", 32),
    "mxfp6_e2m3": ("mx", "e2m3", 32),
    "mxfp4": ("mx", "e2m1", 32),
    "mxint8": ("mx", "int8", 32),
    "nvfp4": ("nvfp4", "e2m1", 16),
}
WIDTHS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "mxfp8_e4m3": 8, "mxfp8_e5m2": 8, "mxfp6_e3m2": 6, "mxfp6_e2m3": 6,
          "mxfp4": 4, "mxint8": 8, "nvfp4": 4}  # fmt: skip
ALL_TYPES = ["weight", "input", "output"]


def mlp(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))


def batches(count, seed=1, shape=(8, 64)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) * 3 for _ in range(count)]


def train(model, optimizer, data):
    model.train()
    for x in data:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def qat(model, config, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    quantizer = QAT_Quantizer(model, config, optimizer)
    quantizer.compress()
    return quantizer, optimizer


def by_hand(dtype, x, scale=None, dim=-1, block_size=None):
    """The public op of ``dtype`` on ``x``: blocks along ``dim``; ``scale`` the FP8 scale or NVFP4's per-tensor one."""
    op, elem, default_block = FORMATS[dtype]
    block = default_block if block_size is None else block_size
    if op == "fp8":
        return fakequant.fake_quant_fp8(x, scale, elem, 0)
    if op == "mx":
        return fakequant.fake_quant_mx(x, elem, block, axis=dim)
    return fakequant.fake_quant_nvfp4(x.movedim(dim, -1), scale, block_size=block).movedim(-1, dim)


def tracked_scale(dtype, tracked_range):
    """The activation scale of a tracked [min, max]: FP8 amax / max, NVFP4 amax / (6 * 448)."""
    amax = torch.maximum(-tracked_range[0], tracked_range[1]).float()
    op, elem, _ = FORMATS[dtype]
    if op == "nvfp4":
        return torch.clamp(amax / (6.0 * 448.0), min=2.0**-126)
    return reference.fp8_scale_from_amax(amax, ELEMENT_FORMATS[elem])


def assert_bits_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(actual.nan_to_num(0.0), expected.nan_to_num(0.0))


# ------------------------------------------------------------------------------------------------
# Every quant_dtype: training steps, and the outputs against the public ops applied by hand
# ------------------------------------------------------------------------------------------------


def expected_mlp_output(model, quantizer, dtype, x):
    """The eval-mode forward of :func:`mlp` with every Linear's weight, input and output fake-quantized by hand."""
    h = x
    for name in ("0", "2"):
        module = getattr(model, name)
        weight = module.parametrizations.weight.original
        scales = {t: module._buffers.get(f"fakequant_{t}_scale") for t in ("input", "output")}
        if FORMATS[dtype][0] != "mx":
            for t in ("input", "output"):
                assert torch.equal(scales[t], tracked_scale(dtype, getattr(module, f"fakequant_{t}_range")))
        h = by_hand(dtype, h, scales["input"])
        h = nn.functional.linear(h, by_hand(dtype, weight), module.bias)
        h = by_hand(dtype, h, scales["output"])
        if name == "0":
            h = torch.relu(h)
    return h


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_every_format_trains_and_equals_the_ops_applied_by_hand(dtype, backend):
    model = mlp()
    quantizer, optimizer = qat(model, [{"quant_types": ALL_TYPES, "quant_dtype": dtype, "op_types": ["Linear"]}])
    spec = quantizer.layer_configs["0"].specs["weight"]
    assert isinstance(spec, FloatSpec) and spec.quant_dtype == dtype and spec.bits == WIDTHS[dtype]
    before = model[0].parametrizations.weight.original.detach().clone()
    train(model, optimizer, batches(3))
    assert quantizer.steps == 3
    assert not torch.equal(before, model[0].parametrizations.weight.original)
    model.eval()
    x = batches(1, seed=7)[0]
    with torch.no_grad():
        assert_bits_equal(model(x), expected_mlp_output(model, quantizer, dtype, x))
    # the weight the module computes with is the op's fake-quantized master weight
    assert_bits_equal(model[2].weight, by_hand(dtype, model[2].parametrizations.weight.original.detach()))


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "mxfp4", "nvfp4"])
def test_training_is_bit_identical_on_every_backend(dtype, backend):
    config = [{"quant_types": ALL_TYPES, "quant_dtype": dtype, "op_types": ["Linear"]}]
    states = []
    for name in (backend, "reference"):
        fakequant.set_backend(name)
        model = mlp()
        _, optimizer = qat(model, config)
        train(model, optimizer, batches(3))
        states.append(model.state_dict())
    fakequant.set_backend(backend)
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "nvfp4"])
def test_activation_scale_follows_the_ema_of_the_range(dtype):
    model = mlp()
    quantizer, _ = qat(model, [{"quant_types": ["input"], "quant_dtype": dtype, "op_names": ["2"]}])
    first, second = batches(2)
    hidden = []
    # the ReLU's output: what reaches fc2 before its input is quantized
    handle = model[1].register_forward_hook(lambda module, args, out: hidden.append(out.detach().clone()))
    model(first)
    tracked = model[2].fakequant_input_range
    assert torch.equal(tracked, torch.stack([hidden[0].min(), hidden[0].max()]))  # the first batch initialises it
    model(second)
    handle.remove()
    batch = torch.stack([hidden[1].min(), hidden[1].max()])
    expected = torch.stack([hidden[0].min(), hidden[0].max()])
    expected = expected + (batch - expected) * torch.tensor(1.0 - 0.99, dtype=torch.float32)
    assert torch.equal(tracked, expected)
    assert torch.equal(model[2].fakequant_input_scale, tracked_scale(dtype, tracked))
    assert quantizer.layers["2"].observed["input"]


def test_fp8_weight_per_tensor_per_channel_and_blocks():
    op = fakequant.fake_quant_fp8
    cases = [({}, lambda w: op(w, None, "e4m3", 0)),
             ({"quant_scheme": "per_channel_symmetric"}, lambda w: op(w, None, "e4m3", w[0].numel())),
             ({"granularity": "per_channel"}, lambda w: op(w, None, "e4m3", w[0].numel())),
             ({"block_size": 16}, lambda w: op(w, None, "e4m3", 16)),
             ({"granularity": PerBlock(8)}, lambda w: op(w, None, "e4m3", 8))]
    for keys, expected in cases:
        model = mlp()
        qat(model, [{"quant_types": ["weight"], "quant_dtype": "fp8_e4m3", "op_types": ["Linear"], **keys}])
        weight = model[0].parametrizations.weight.original.detach()
        assert_bits_equal(model[0].weight, expected(weight))


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_conv_weights_block_along_input_channels_and_activations_along_the_last_dimension(dtype):
    # a Conv2d weight [out, in, kh, kw] is blocked along its input channels (the reduction dimension), a
    # ConvTranspose2d weight [in, out, kh, kw] along dimension 0; FP8 is per tensor
    blocked = FORMATS[dtype][0] != "fp8"
    block = 8 if blocked else None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU6(), nn.ConvTranspose2d(16, 16, 3, padding=1))
    entry = {"quant_types": ALL_TYPES, "quant_dtype": dtype, "op_types": ["Conv2d", "ConvTranspose2d"]}
    quantizer, _ = qat(model, [{**entry, "block_size": block} if blocked else entry])
    if blocked:
        assert quantizer.layer_configs["0"].specs["weight"].granularity == PerBlock(block, 1)
        assert quantizer.layer_configs["2"].specs["weight"].granularity == PerBlock(block, 0)
    conv, tconv = model[0], model[2]
    assert_bits_equal(conv.weight, by_hand(dtype, conv.parametrizations.weight.original.detach(), dim=1,
                                           block_size=block))  # fmt: skip
    assert_bits_equal(tconv.weight, by_hand(dtype, tconv.parametrizations.weight.original.detach(), dim=0,
                                            block_size=block))  # fmt: skip
    x = torch.randn(2, 16, 16, 16)
    model(x)  # training mode: observes the ranges
    model.eval()
    with torch.no_grad():
        h = by_hand(dtype, x, conv._buffers.get("fakequant_input_scale"), block_size=block)  # along the width
        h = nn.functional.conv2d(h, conv.weight, conv.bias, padding=1)
        h = by_hand(dtype, h, conv._buffers.get("fakequant_output_scale"), block_size=block)
        assert_bits_equal(model[:2](x), nn.functional.relu6(h))


def test_fp8_per_channel_conv_transpose_weight_is_along_its_output_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3))
    qat(model, [{"quant_types": ["weight"], "quant_dtype": "fp8_e5m2", "granularity": "per_channel",
                 "op_types": ["ConvTranspose2d"]}])  # fmt: skip
    weight = model[0].parametrizations.weight.original.detach()
    expected = fakequant.fake_quant_fp8(weight.movedim(1, 0), None, "e5m2", weight[:, 0].numel()).movedim(0, 1)
    assert_bits_equal(model[0].weight, expected)


def test_relu_output_is_quantized_after_the_relu():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    qat(model, [{"quant_types": ["output"], "quant_dtype": "fp8_e4m3", "op_types": ["ReLU"]}])
    x = torch.randn(4, 16)
    out = model(x)
    scale = model[1].fakequant_output_scale
    assert torch.equal(model[1].fakequant_output_range[0], torch.tensor(0.0))
    assert_bits_equal(out, fakequant.fake_quant_fp8(torch.relu(model[0](x)), scale, "e4m3"))


def test_mixed_integer_and_float_formats_in_one_entry():
    model = mlp()
    quantizer, optimizer = qat(model, [{"quant_types": ["weight", "input"], "quant_dtype": {"weight": "nvfp4"},
                                        "quant_bits": {"input": 6}, "op_types": ["Linear"]}])  # fmt: skip
    config = quantizer.layer_configs["0"]
    assert isinstance(config.specs["weight"], FloatSpec) and config.specs["input"].bits == 6
    assert config.specs["input"].quant_max == 63
    train(model, optimizer, batches(2))
    assert {"0.fakequant_input_zero_point", "0.fakequant_input_scale"} <= set(model.state_dict())


def test_quant_start_step_keeps_float_until_reached():
    model = mlp()
    quantizer, optimizer = qat(model, [{"quant_types": ALL_TYPES, "quant_dtype": "fp8_e4m3", "op_types": ["Linear"],
                                        "quant_start_step": 2}])  # fmt: skip
    weight = model[0].parametrizations.weight.original
    assert torch.equal(model[0].weight, weight)
    train(model, optimizer, batches(2))
    assert quantizer.layers["0"].observed["input"]  # ranges tracked before the start step
    assert_bits_equal(model[0].weight, by_hand("fp8_e4m3", weight.detach()))


def test_half_model_trains():
    model = mlp().half()
    quantizer, optimizer = qat(model, [{"quant_types": ALL_TYPES, "quant_dtype": "nvfp4", "op_types": ["Linear"]}])
    train(model, optimizer, [x.half() for x in batches(2)])
    model.eval()
    assert model(batches(1)[0].half()).dtype == torch.float16


# ------------------------------------------------------------------------------------------------
# Errors: the entry, the key and what is allowed
# ------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.odd = nn.Linear(24, 8)
        self.bn = nn.BatchNorm1d(8)
        self.conv = nn.Conv2d(3, 8, 3)


LINEAR = {"quant_types": ["weight"], "op_names": ["fc"]}


@pytest.mark.parametrize(
    "entry, message",
    [
        ({**LINEAR, "quant_dtype": "mxfp4", "quant_bits": 8},
         "key 'quant_bits' has value 8; allowed: 4 for 'weight', or no quant_bits: quant_dtype 'mxfp4' fixes the "
         "width"),
        ({**LINEAR, "quant_dtype": "fp8_e5m2", "quant_bits": {"weight": 4}},
         "key 'quant_bits' has value {'weight': 4}; allowed: 8 for 'weight'"),
        ({**LINEAR, "quant_dtype": "fp8"}, "key 'quant_dtype' has value 'fp8'; allowed: one of ['int', 'uint'], or a "
                                           "float format ['fp8_e4m3', 'fp8_e5m2', 'mxfp8_e4m3', 'mxfp8_e5m2', "
                                           "'mxfp6_e3m2', 'mxfp6_e2m3', 'mxfp4', 'mxint8', 'nvfp4']"),
        ({"quant_types": ["weight"], "op_names": ["odd"], "quant_dtype": "mxfp6_e2m3"},
         "key 'block_size' has value 32 for 'weight' (quant_dtype 'mxfp6_e2m3', whose default block size is 32), but "
         "module 'odd' (Linear) has 24 input channels (weight shape (8, 24)), not a multiple of it; allowed: a "
         "block_size that divides the input channels"),
        ({"quant_types": ["weight"], "op_names": ["odd"], "quant_dtype": "nvfp4", "block_size": 16},
         "key 'block_size' has value 16 for 'weight' (quant_dtype 'nvfp4', whose default block size is 16), but "
         "module 'odd' (Linear) has 24 input channels"),
        ({"quant_types": ["weight"], "op_names": ["conv"], "quant_dtype": "mxint8", "block_size": 2},
         "key 'block_size' has value 2 for 'weight' (quant_dtype 'mxint8'), but module 'conv' (Conv2d) has 3 input "
         "channels (weight shape (8, 3, 3, 3))"),
        ({"quant_types": ["weight"], "op_names": ["bn"], "quant_dtype": "nvfp4"},
         "key 'quant_dtype' has value 'nvfp4' with blocks of 16 for 'weight', but module 'bn' (BatchNorm1d) has a "
         "weight of shape (8,), without input channels to run the blocks along; allowed: block scales (MX, NVFP4, FP8 "
         "blocks) on weights of 2 or more dimensions"),
        ({"quant_types": ["weight"], "op_names": ["fc"], "block_size": 32},
         "key 'block_size' has value 32; allowed: a block size for an entry with a float quant_dtype"),
        ({"quant_types": ["weight", "input"], "op_names": ["fc"], "quant_dtype": {"weight": "mxfp4"},
          "block_size": {"input": 32}},
         "key 'block_size' has value {'input': 32}; allowed: a block size for quant types whose quant_dtype is a float "
         "format"),
        ({**LINEAR, "quant_dtype": "mxfp4", "block_size": 0}, "key 'block_size' has value 0; allowed: an int >= 1"),
        ({**LINEAR, "quant_dtype": "mxfp4", "block_size": 16.0}, "key 'block_size' has value 16.0; allowed: an int"),
        ({**LINEAR, "quant_dtype": "fp8_e4m3", "quant_scheme": "per_tensor_affine"},
         "key 'quant_scheme' has value 'per_tensor_affine'; allowed: 'per_tensor_symmetric' or "
         "'per_channel_symmetric' for 'weight': quant_dtype 'fp8_e4m3' has no zero point"),
        ({**LINEAR, "quant_dtype": "mxfp4", "quant_scheme": "per_tensor_symmetric"},
         "key 'quant_scheme' has value 'per_tensor_symmetric'; allowed: no quant_scheme for 'weight': quant_dtype "
         "'mxfp4' has a scale per block"),
        ({**LINEAR, "quant_dtype": "nvfp4", "granularity": "per_channel"},
         "key 'granularity' has value 'per_channel'; allowed: PerBlock(n) or an int n for the weight: quant_dtype "
         "'nvfp4' has a scale per block"),
        ({**LINEAR, "granularity": PerBlock(16)},
         "key 'granularity' has value PerBlock(block_size=16, dim=-1); allowed: PerTensor(), PerChannel(0) or "
         "PerGroup(n) for an integer weight"),
        ({**LINEAR, "quant_dtype": "mxfp4", "granularity": 16, "block_size": 32},
         "key 'block_size' has value 32; allowed: either 'block_size' or 'granularity' for the weight"),
    ],
)
def test_bad_float_config_names_the_entry_key_and_what_is_allowed(entry, message):
    with pytest.raises(ValueError) as info:
        QAT_Quantizer(Net(), [{"quant_types": ["weight"], "op_names": ["fc"]}, entry])
    assert str(info.value).startswith("config_list[1]: ")
    assert message in str(info.value)


def test_matching_quant_bits_and_bits_left_out_are_accepted():
    for entry in ({**LINEAR, "quant_dtype": "mxfp4", "quant_bits": 4},
                  {"quant_types": ["weight", "input"], "op_names": ["fc"], "quant_dtype": {"weight": "mxfp6_e3m2"},
                   "quant_bits": {"input": 8}},
                  {**LINEAR, "quant_dtype": "mxfp4", "granularity": 16, "block_size": 16}):  # fmt: skip
        configs = QAT_Quantizer(Net(), [entry]).layer_configs
        assert configs["fc"].specs["weight"].bits == WIDTHS[entry["quant_dtype"] if isinstance(
            entry["quant_dtype"], str) else entry["quant_dtype"]["weight"]]  # fmt: skip


def test_activation_block_size_is_checked_when_the_module_runs():
    model = nn.Sequential(nn.Linear(64, 40))
    quantizer, _ = qat(model, [{"quant_types": ["output"], "quant_dtype": "mxfp8_e5m2", "op_types": ["Linear"]}])
    with pytest.raises(ValueError) as info:
        model(torch.randn(2, 64))
    assert str(info.value).startswith(
        "config_list[0]: key 'block_size' has value 32 for 'output' (quant_dtype 'mxfp8_e5m2', whose default block "
        "size is 32), but module '0' (Linear) has an output of shape (2, 40), whose last dimension is not a multiple "
        "of it; allowed: a block_size that divides the last dimension of the outputs"
    )
    quantizer.unwrap()
    qat(model, [{"quant_types": ["output"], "quant_dtype": "mxfp8_e5m2", "block_size": 8, "op_types": ["Linear"]}])
    assert model(torch.randn(2, 64)).shape == (2, 40)


def test_float_spec_validates_on_construction():
    assert FloatSpec("nvfp4").granularity == PerBlock(16)
    assert FloatSpec("fp8_e5m2").granularity == PerTensor() and FloatSpec("fp8_e5m2").bits == 8
    assert FloatSpec("mxfp6_e2m3").bits == 6 and FloatSpec("mxint8").bits == 8
    with pytest.raises(ValueError, match=r"FloatSpec: quant_dtype must be one of \['fp8_e4m3'"):
        FloatSpec("fp4")
    with pytest.raises(ValueError, match=r"FloatSpec: 'mxfp4' scales each block: its granularity is PerBlock\(n\)"):
        FloatSpec("mxfp4", PerChannel(0))
    with pytest.raises(ValueError, match=r"PerBlock: block_size must be an int >= 1, got 0"):
        PerBlock(0)
    with pytest.raises(ValueError, match=r"QuantSpec: granularity must be"):
        fakequant.QuantSpec(granularity=PerBlock(32))


def test_float_weights_are_not_bn_folded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    config = [{"quant_types": ["weight"], "quant_dtype": "mxfp4", "block_size": 16, "op_types": ["Conv2d"]}]
    quantizer, _ = qat(model, config)
    assert quantizer.folded_pairs == {} and isinstance(model[1], nn.BatchNorm2d)
    with pytest.raises(ValueError, match=r"bn_folding pair \('0', '1'\): '0' has a float weight format \('mxfp4'\)"):
        QAT_Quantizer(nn.Sequential(nn.Conv2d(16, 8, 3), nn.BatchNorm2d(8)), config, bn_folding=[("0", "1")])


def test_onnx_export_is_refused_naming_every_float_tensor(tmp_path):
    pytest.importorskip("onnxscript")
    model = mlp()
    quantizer, optimizer = qat(model, [{"quant_types": ["weight", "input"], "quant_dtype": "fp8_e4m3",
                                        "op_names": ["0"]},
                                       {"quant_types": ["weight"], "quant_dtype": "mxfp4", "op_names": ["2"]}])
    train(model, optimizer, batches(1))
    with pytest.raises(ValueError) as info:
        quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "m.onnx", input_shape=(1, 64))
    message = str(info.value)
    assert "3 quantized tensor(s) have no QuantizeLinear/DequantizeLinear form" in message
    for layer, quant_type, dtype in (("0", "weight", "fp8_e4m3"), ("0", "input", "fp8_e4m3"), ("2", "weight", "mxfp4")):
        assert (f"layer {layer!r} {quant_type}: quant_dtype {dtype!r} has no QuantizeLinear/DequantizeLinear form in "
                "this exporter") in message
    assert "allowed: quant_dtype 'int' or 'uint'" in message
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.pth").exists()


# ------------------------------------------------------------------------------------------------
# State: state_dict round trip, calibration records, calibrate
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "mxfp6_e3m2", "nvfp4"])
def test_state_dict_round_trip_gives_the_same_outputs(dtype, tmp_path):
    config = [{"quant_types": ALL_TYPES, "quant_dtype": dtype, "op_types": ["Linear"]}]
    model = mlp()
    _, optimizer = qat(model, config)
    train(model, optimizer, batches(3))
    torch.save(model.state_dict(), tmp_path / "state.pth")
    model.eval()
    x = batches(1, seed=9)[0]
    expected = model(x)
    keys = {key for key in model.state_dict() if "fakequant" in key}
    if dtype == "mxfp6_e3m2":
        assert keys == {"fakequant_step"}  # block scales come from each block: nothing to save
    else:
        assert keys == {"fakequant_step"} | {f"{layer}.fakequant_{t}_{what}" for layer in ("0", "2")
                                             for t in ("input", "output") for what in ("scale", "range", "observed")}

    rebuilt = mlp(seed=123)
    quantizer, _ = qat(rebuilt, config)
    rebuilt.load_state_dict(torch.load(tmp_path / "state.pth"))
    assert quantizer.steps == 3
    rebuilt.eval()
    assert_bits_equal(rebuilt(x), expected)


def test_calibration_records_of_float_formats():
    model = mlp()
    quantizer, optimizer = qat(model, [
        {"quant_types": ALL_TYPES, "quant_dtype": "fp8_e5m2", "quant_scheme": {"weight": "per_channel_symmetric"},
         "op_names": ["0"]},
        {"quant_types": ALL_TYPES, "quant_dtype": "mxfp4", "op_names": ["2"]},
    ])  # fmt: skip
    train(model, optimizer, batches(2))
    records = quantizer.calibration()
    fp8, mx = records["0"], records["2"]
    weight = model[0].parametrizations.weight.original.detach()
    e5m2 = ELEMENT_FORMATS["e5m2"]
    assert fp8["weight_bits"] == 8 and fp8["weight_quant_dtype"] == "fp8_e5m2" and fp8["weight_axis"] == 0
    assert torch.equal(fp8["weight_scale"], reference.fp8_scale_from_amax(weight.abs().amax(1), e5m2))
    assert fp8["tracked_min_input"] == float(model[0].fakequant_input_range[0])
    assert torch.equal(fp8["input_scale"], model[0].fakequant_input_scale)
    assert "input_zero_point" not in fp8
    assert mx == {"op_type": "Linear", "weight_bits": 4, "weight_quant_dtype": "mxfp4", "weight_block_size": 32,
                  "input_bits": 4, "input_quant_dtype": "mxfp4", "input_block_size": 32, "output_bits": 4,
                  "output_quant_dtype": "mxfp4", "output_block_size": 32}  # fmt: skip

    # load_calibration_config sets the tracked ranges and the scales that follow
    fresh = mlp()
    fresh_quantizer, _ = qat(fresh, quantizer.config_list)
    fresh_quantizer.load_calibration_config(records)
    for t in ("input", "output"):
        assert torch.equal(fresh[0]._buffers[f"fakequant_{t}_scale"], model[0]._buffers[f"fakequant_{t}_scale"])
        assert fresh_quantizer.layers["0"].observed[t]


def test_calibrate_sets_fp8_and_nvfp4_per_tensor_scales():
    model = mlp()
    data = batches(4, seed=3)
    config = [{"quant_types": ["input", "output"], "quant_dtype": "fp8_e4m3", "op_names": ["0"]},
              {"quant_types": ["input", "output"], "quant_dtype": {"input": "nvfp4", "output": "mxfp8_e4m3"},
               "op_names": ["2"]}]
    with torch.no_grad():
        reference_model = mlp()
        inputs = torch.cat(data)
        hidden = torch.relu(reference_model[0](inputs))
    quantizer = fakequant.calibrate(model, config, [(x, None) for x in data])
    low, high = inputs.min(), inputs.max()
    assert torch.equal(model[0].fakequant_input_range, torch.stack([low, high]))
    assert torch.equal(model[0].fakequant_input_scale, reference.fp8_scale_from_amax(
        torch.maximum(-low, high), ELEMENT_FORMATS["e4m3"]))  # fmt: skip
    # the calibration forward runs in eval mode: fc0's output was not yet calibrated, so it ran in float
    assert torch.equal(model[2].fakequant_input_scale, torch.clamp(hidden.max() / (6.0 * 448.0), min=2.0**-126))
    records = quantizer.calibration()
    assert records["0"]["input_scale"] == model[0].fakequant_input_scale
    assert "tracked_min_output" not in records["2"]  # MX: its block scales need no calibration
    model.eval()
    x = data[0]
    with torch.no_grad():
        h = fakequant.fake_quant_fp8(x, model[0].fakequant_input_scale, "e4m3")
        expected = fakequant.fake_quant_fp8(nn.functional.linear(h, model[0].weight, model[0].bias),
                                            model[0].fakequant_output_scale, "e4m3")  # fmt: skip
        expected = torch.relu(expected)
        expected = fakequant.fake_quant_nvfp4(expected, model[2].fakequant_input_scale.reshape(1))
        expected = fakequant.fake_quant_mx(nn.functional.linear(expected, model[2].weight, model[2].bias), "e4m3")
        assert_bits_equal(model(x), expected)


# ------------------------------------------------------------------------------------------------
# LsqQuantizer: learned FP8 scales
# ------------------------------------------------------------------------------------------------


def lsq_fp8_scale_grad(x, scale, grad, fmt_max, grad_factor):
    """LSQ's scale gradient with the FP8 grid, written out: per scale, sum of grad * (q(v) - v) inside the range and
    grad * sign(v) * max outside, times grad_factor."""
    v = x / scale
    q = fakequant.fake_quant_fp8(x, scale.reshape(-1) if scale.dim() == 0 else scale.flatten(), "e4m3",
                                 0 if scale.numel() == 1 else x[0].numel()) / scale  # fmt: skip
    derivative = torch.where(v.abs() <= fmt_max, q - v, torch.sign(v) * fmt_max)
    dims = tuple(range(1, x.dim())) if scale.numel() > 1 else tuple(range(x.dim()))
    return (grad * derivative).sum(dims) * grad_factor


def test_lsq_learns_fp8_scales_with_lsqs_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    config = [{"quant_types": ["weight", "input"], "quant_dtype": "fp8_e4m3",
               "quant_scheme": {"weight": "per_channel_symmetric"}, "op_types": ["Linear"]}]  # fmt: skip
    quantizer = LsqQuantizer(model, config, optimizer)
    quantizer.compress()
    layer = model[0]
    weight = layer.parametrizations.weight.original
    weight_scale = layer.fakequant_weight_scale
    assert isinstance(weight_scale, nn.Parameter) and weight_scale.shape == (8,)
    assert not hasattr(layer, "fakequant_weight_zero_point") and not hasattr(layer, "fakequant_input_zero_point")
    # initialised to amax / 448: nothing saturates
    assert torch.equal(weight_scale.detach(), reference.fp8_scale_from_amax(weight.detach().abs().amax(1),
                                                                            ELEMENT_FORMATS["e4m3"]))  # fmt: skip
    with torch.no_grad():
        weight_scale.mul_(0.5)  # half of the weights now saturate: both parts of the gradient are exercised
    x = torch.randn(4, 16) * 2
    out = layer(x)
    input_scale = layer.fakequant_input_scale
    assert torch.equal(input_scale.detach().reshape(()), reference.fp8_scale_from_amax(x.abs().amax(),
                                                                                       ELEMENT_FORMATS["e4m3"]))
    xq = fakequant.fake_quant_fp8(x, input_scale.detach(), "e4m3")
    wq = fakequant.fake_quant_fp8(weight.detach(), weight_scale.detach(), "e4m3", 16)
    assert_bits_equal(out, nn.functional.linear(xq, wq, layer.bias))

    out.sum().backward()
    grad_w = torch.ones(4, 8).T @ xq  # d sum(x_q w_q^T) / d w_q
    expected = lsq_fp8_scale_grad(weight.detach(), weight_scale.detach()[:, None], grad_w, 448.0,
                                  1.0 / math.sqrt(16 * 448.0))  # fmt: skip
    torch.testing.assert_close(weight_scale.grad, expected, rtol=1e-5, atol=1e-7)
    grad_x = torch.ones(4, 8) @ wq
    expected = lsq_fp8_scale_grad(x, input_scale.detach().reshape(()), grad_x, 448.0, 1.0 / math.sqrt(64 * 448.0))
    torch.testing.assert_close(input_scale.grad.reshape(()), expected, rtol=1e-5, atol=1e-7)
    saturated = weight.detach().abs() > 448.0 * weight_scale.detach()[:, None]
    assert saturated.any() and torch.equal(weight.grad[saturated], torch.zeros(int(saturated.sum())))

    before = weight_scale.detach().clone()
    optimizer.step()
    assert not torch.equal(before, weight_scale.detach())
    record = quantizer.calibration()["0"]
    assert record["weight_quant_dtype"] == "fp8_e4m3" and "weight_zero_point" not in record
    assert torch.equal(record["weight_scale"], weight_scale.detach())


def test_lsq_fp8_state_dict_round_trip(tmp_path):
    config = [{"quant_types": ["weight", "input"], "quant_dtype": "fp8_e5m2", "op_types": ["Linear"]}]
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    LsqQuantizer(model, config, optimizer).compress()
    train(model, optimizer, batches(2))
    torch.save(model.state_dict(), tmp_path / "state.pth")
    model.eval()
    x = batches(1, seed=4)[0]
    expected = model(x)
    rebuilt = mlp(seed=5)
    LsqQuantizer(rebuilt, config, torch.optim.SGD(rebuilt.parameters(), lr=0.01)).compress()
    rebuilt.load_state_dict(torch.load(tmp_path / "state.pth"))
    rebuilt.eval()
    assert_bits_equal(rebuilt(x), expected)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"quant_dtype": "mxfp4"}, "key 'quant_dtype' has value 'mxfp4'; allowed: one of ['int', 'uint'], or a float "
                                   "format ['fp8_e4m3', 'fp8_e5m2'], or a dict {quant_type: dtype} (LsqQuantizer does "
                                   "not take 'mxfp4'; it learns FP8 scales, while MX and NVFP4 compute their block "
                                   "scales from each block: use QAT_Quantizer for them)"),
        ({"quant_dtype": "nvfp4"}, "LsqQuantizer does not take 'nvfp4'"),
        ({"quant_dtype": "fp8_e4m3", "block_size": 16}, "unknown key 'block_size' (value 16); LsqQuantizer allows:"),
        ({"quant_dtype": "fp8_e4m3", "granularity": 16},
         "key 'granularity' has value PerBlock(16) for the weight of 'fc' (quant_dtype 'fp8_e4m3'); allowed: "
         "PerTensor() or PerChannel(0) (LsqQuantizer learns FP8 scales per tensor or per channel, not per block)"),
    ],
)
def test_lsq_refuses_what_it_cannot_learn(entry, message):
    with pytest.raises(ValueError) as info:
        LsqQuantizer(Net(), [{**LINEAR, **entry}])
    assert str(info.value).startswith("config_list[0]: ") and message in str(info.value)


# ------------------------------------------------------------------------------------------------
# DDP: the tracked ranges of the per-tensor float scales are all-reduced as the integer ones are
# ------------------------------------------------------------------------------------------------


def _ddp_rank(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = mlp()  # the same initial weights on every rank
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        QAT_Quantizer(model, [{"quant_types": ALL_TYPES, "quant_dtype": {"weight": "mxfp4", "input": "fp8_e4m3",
                                                                          "output": "nvfp4"},
                               "op_types": ["Linear"]}], optimizer).compress()  # fmt: skip
        ddp = nn.parallel.DistributedDataParallel(model)
        for x in batches(3, seed=100 + rank):  # different data on every rank
            optimizer.zero_grad()
            (ddp(x * (1 + rank)).square().mean()).backward()
            optimizer.step()
        torch.save({k: v.clone() for k, v in model.state_dict().items() if "fakequant_" in k}, f"{out_dir}/{rank}.pth")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_hold_identical_float_scales(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from tests.test_ddp import free_port

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in this torch")
    mp.spawn(_ddp_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"{rank}.pth") for rank in range(2)]
    assert states[0].keys() == states[1].keys() and "0.fakequant_output_scale" in states[0]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
