"""ONNX export (``Quantizer.export_model(onnx_path=...)``): Q/DQ pairs holding the calibration's scales and
zero points, onnxruntime against the PyTorch eval-mode output, refused ranges, restored training modes.

Skipped where onnx, onnxscript or onnxruntime is not installed (requirements.txt installs them).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from fakequant import BNNQuantizer, DoReFaQuantizer, NaiveQuantizer, QAT_Quantizer  # noqa: E402
from fakequant.bn_fold import ConvBnQAT  # noqa: E402

INPUT_SHAPE = (8, 3, 12, 12)


class SmallCNN(nn.Module):
    """Two Conv+BN+ReLU blocks, global average pooling and a Linear classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def cnn_config(scheme):
    """8-bit weights (``scheme``), the uint8 network input, uint8 ReLU outputs, the int8 network output."""
    return [
        {"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": ["conv1"],
         "quant_scheme": {"weight": scheme, "input": "per_tensor_affine"}},
        {"quant_types": ["weight"], "quant_bits": 8, "op_names": ["conv2"], "quant_scheme": scheme},
        {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
        {"quant_types": ["weight", "output"], "quant_bits": 8, "op_names": ["fc"],
         "quant_scheme": {"weight": scheme, "output": "per_tensor_affine"}, "quant_dtype": {"output": "int"}},
    ]


def trained(model, config, input_shape=INPUT_SHAPE, steps=4, seed=0, quantizer_class=QAT_Quantizer, **kwargs):
    """The model quantized and trained a few SGD steps on synthetic data (left in training mode)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    quantizer = quantizer_class(model, config, optimizer, **kwargs)
    quantizer.compress()
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randn((8, *input_shape[1:]), generator=generator)
        target = torch.randint(0, 10, (8,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, quantizer


class Graph:
    """An exported model: its Q/DQ pairs and their constants."""

    def __init__(self, path):
        self.model = onnx.load(str(path))
        self.nodes = list(self.model.graph.node)
        self.values = {init.name: numpy_helper.to_array(init) for init in self.model.graph.initializer}
        for node in self.nodes:  # constants may also come as Constant nodes
            if node.op_type == "Constant":
                self.values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def ops(self, op_type):
        return [node for node in self.nodes if node.op_type == op_type]

    @staticmethod
    def axis(node):
        return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)

    def qdq(self):
        """{scale initializer name: (QuantizeLinear, DequantizeLinear)}; checks that each Q feeds one DQ with
        the same scale, zero point and axis."""
        consumers = {}
        for node in self.nodes:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        pairs = {}
        for q in self.ops("QuantizeLinear"):
            (dq,) = consumers[q.output[0]]
            assert dq.op_type == "DequantizeLinear"
            assert list(dq.input[1:]) == list(q.input[1:]) and self.axis(dq) == self.axis(q)
            assert q.input[1] not in pairs
            pairs[q.input[1]] = (q, dq)
        assert len(pairs) == len(self.ops("DequantizeLinear"))
        return pairs


def expected_qdq(calibration):
    """{scale initializer name: (quant type, record)} of every fake-quantized tensor of the calibration."""
    return {
        f"{layer}.fakequant_onnx_{quant_type}_scale": (quant_type, record)
        for layer, record in calibration.items()
        for quant_type in ("weight", "input", "output")
        if f"{quant_type}_scale" in record
    }


def check_qdq_matches_calibration(graph, calibration):
    pairs = graph.qdq()
    expected = expected_qdq(calibration)
    assert set(pairs) == set(expected)
    for scale_name, (quant_type, record) in expected.items():
        q, _ = pairs[scale_name]
        scale, zero_point = graph.values[q.input[1]], graph.values[q.input[2]]
        assert scale.dtype == np.float32
        np.testing.assert_array_equal(scale, record[f"{quant_type}_scale"].numpy())
        np.testing.assert_array_equal(zero_point.astype(np.int32), record[f"{quant_type}_zero_point"].numpy())
        signed = record[f"{quant_type}_quant_min"] < 0
        assert zero_point.dtype == (np.int8 if signed else np.uint8)
        if f"{quant_type}_axis" in record:
            assert scale.ndim == 1 and graph.axis(q) == record[f"{quant_type}_axis"]
        else:
            assert scale.ndim == 0
        if quant_type == "weight":
            # the stored weight is on the grid: its integer levels lie in the layer's range and dequantize to
            # exactly the stored values
            weight = graph.values[q.input[0]]
            shape = [-1] + [1] * (weight.ndim - 1) if scale.ndim else []
            s, z = scale.reshape(shape), zero_point.astype(np.int32).reshape(shape)
            levels = np.rint(weight / s) + z
            assert levels.min() >= record["weight_quant_min"] and levels.max() <= record["weight_quant_max"]
            np.testing.assert_array_equal(((levels - z) * s).astype(np.float32), weight)


def run_ort(path, x, optimized):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a shared 2-core machine
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def check_ort_matches_pytorch(path, model, input_shape, output_scale=None, seed=5):
    """onnxruntime's output against the PyTorch eval-mode (fake-quantized) output, on fresh random inputs.

    ``output_scale``: the scale of the model's quantized output, or None for a float output.

    Two onnxruntime modes:

    * graph optimizations off ("reference"): ONNX Runtime computes the graph as written, every Q/DQ and
      conv in float. It then agrees with PyTorch to float rounding, except where a value lies within
      float error of a rounding tie of some quantizer: ONNX Runtime accumulates convolutions and matmuls
      in another order, and QuantizeLinear divides by the scale where fakequant multiplies by the
      reciprocal, so such a value can land on the neighbouring level. Required: at least 90% of the
      elements within 1e-5 relative (they are all there in practice).
    * all optimizations ("int8 kernels"): ONNX Runtime fuses DQ -> Conv -> Relu -> Q into int8 QLinearConv
      kernels, which round the bias to int32 in units of input scale x weight scale and requantize in
      fixed point. That moves some activations by one level, so more output elements differ slightly
      (a quarter to a third of the float outputs of the folded CNN, by ~1e-4 here); only the bound below
      is required.

    Bound for every element, in both modes: one output level (quantized output), or 1% of the output's
    largest magnitude (float output; the differences seen are about 0.1%).
    """
    model.eval()
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(x).numpy().astype(np.float64)
    bound = output_scale * (1 + 1e-5) if output_scale is not None else 0.01 * np.abs(expected).max()
    worst = {}
    for mode, optimized in (("reference", False), ("int8 kernels", True)):
        got = run_ort(path, x, optimized)
        assert got.shape == expected.shape and got.dtype == np.float32
        difference = np.abs(got - expected)
        worst[mode] = float(difference.max())
        assert difference.max() <= bound, (mode, difference.max(), bound)
        if not optimized:
            close = difference <= 1e-5 * np.abs(expected) + 1e-7
            assert close.mean() >= 0.9, (mode, close.mean(), difference.max())
    return worst


# ------------------------------------------------------------------------------------------------
# QAT models: the graph and onnxruntime
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme, bn_folding, quantized_output", [
    ("per_tensor_symmetric", True, True),
    ("per_tensor_symmetric", False, False),
    ("per_channel_symmetric", True, False),
    ("per_channel_symmetric", False, True),
    ("per_channel_affine", True, True),
    ("per_channel_affine", False, False),
])
def test_cnn_exports_qdq_with_the_calibration_and_matches_onnxruntime(tmp_path, scheme, bn_folding,
                                                                      quantized_output):
    config = cnn_config(scheme)
    if not quantized_output:  # a float network output shows float differences the output Q/DQ would hide
        config[3] = {"quant_types": ["weight"], "quant_bits": 8, "op_names": ["fc"], "quant_scheme": scheme}
    model, quantizer = trained(SmallCNN(), config, bn_folding=bn_folding)
    assert bool(quantizer.folded_pairs) == bn_folding
    calibration = quantizer.export_model(tmp_path / "m.pth", tmp_path / "c.pth", onnx_path=tmp_path / "m.onnx",
                                         input_shape=INPUT_SHAPE)
    assert model.training  # restored
    assert not (tmp_path / "m.onnx.data").exists()  # one file, as NNI writes it
    graph = Graph(tmp_path / "m.onnx")
    check_qdq_matches_calibration(graph, calibration)
    # conv1 weight + input, conv2 weight, relu1/relu2 outputs, fc weight (+ output)
    assert len(graph.ops("QuantizeLinear")) == (7 if quantized_output else 6)
    assert len(graph.ops("Conv")) == 2
    # folded: one conv per pair with the folded bias, no BatchNormalization left
    assert len(graph.ops("BatchNormalization")) == (0 if bn_folding else 2)
    if bn_folding:
        for name in ("conv1", "conv2"):
            module = model.get_submodule(name)
            assert isinstance(module, ConvBnQAT)
            weight, bias = module.inference_weight_and_bias()
            np.testing.assert_array_equal(graph.values[f"{name}.fakequant_onnx_weight"], weight.detach().numpy())
            np.testing.assert_array_equal(graph.values[f"{name}.fakequant_onnx_bias"], bias.detach().numpy())
    else:
        np.testing.assert_array_equal(graph.values["conv1.fakequant_onnx_weight"], model.conv1.weight.detach().numpy())
    # the exported input is the network input: its first node quantizes it
    assert graph.nodes[0].op_type == "QuantizeLinear" and graph.nodes[0].input[0] == graph.model.graph.input[0].name
    output_scale = float(calibration["fc"]["output_scale"]) if quantized_output else None
    check_ort_matches_pytorch(tmp_path / "m.onnx", model, INPUT_SHAPE, output_scale)


def test_linear_layer_int8_activations(tmp_path):
    model = nn.Sequential(nn.Linear(12, 10))
    config = [{"quant_types": ["weight", "input", "output"], "quant_bits": 8, "op_types": ["Linear"],
               "quant_dtype": "int", "quant_scheme": {"weight": "per_tensor_symmetric", "input": "per_tensor_affine",
                                                      "output": "per_tensor_affine"}}]
    model, quantizer = trained(model, config, input_shape=(4, 12))
    calibration = quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "m.onnx", input_shape=(16, 12),
                                         device="cpu")
    graph = Graph(tmp_path / "m.onnx")
    check_qdq_matches_calibration(graph, calibration)
    assert {graph.values[q.input[2]].dtype for q, _ in graph.qdq().values()} == {np.dtype(np.int8)}
    assert graph.model.graph.output[0].name == graph.ops("DequantizeLinear")[-1].output[0]
    check_ort_matches_pytorch(tmp_path / "m.onnx", model, (16, 12), float(calibration["0"]["output_scale"]))


def test_narrow_and_4bit_weights_export_as_int8_holding_their_levels(tmp_path):
    naive = NaiveQuantizer(nn.Sequential(nn.Linear(12, 10)))  # narrow [-127, 127]
    naive.compress()
    calibration = naive.export_model(tmp_path / "n.pth", onnx_path=tmp_path / "n.onnx", input_shape=(4, 12))
    assert (calibration["0"]["weight_quant_min"], calibration["0"]["weight_quant_max"]) == (-127, 127)
    check_qdq_matches_calibration(Graph(tmp_path / "n.onnx"), calibration)

    config = cnn_config("per_channel_symmetric")
    config[1]["quant_bits"] = 4  # conv2's weight: [-8, 7]
    model, quantizer = trained(SmallCNN(), config)
    calibration = quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "m.onnx", input_shape=INPUT_SHAPE)
    assert (calibration["conv2"]["weight_quant_min"], calibration["conv2"]["weight_quant_max"]) == (-8, 7)
    check_qdq_matches_calibration(Graph(tmp_path / "m.onnx"), calibration)  # checks the levels are in [-8, 7]
    check_ort_matches_pytorch(tmp_path / "m.onnx", model, INPUT_SHAPE, float(calibration["fc"]["output_scale"]))


# ------------------------------------------------------------------------------------------------
# Refusals, warnings, modes
# ------------------------------------------------------------------------------------------------


def test_activation_ranges_other_than_int8_uint8_are_refused_before_writing(tmp_path):
    config = cnn_config("per_tensor_symmetric")
    config[2]["quant_bits"] = 4  # ReLU outputs [0, 15]
    config[3]["quant_bits"] = {"weight": 16, "output": 8}  # fc weight [-32768, 32767]
    model, quantizer = trained(SmallCNN(), config, steps=1)
    with pytest.raises(ValueError) as error:
        quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "m.onnx", input_shape=INPUT_SHAPE)
    message = str(error.value)
    assert "3 quantized tensor(s) have no QuantizeLinear/DequantizeLinear form" in message
    assert "layer 'relu1' output: the range [0, 15]" in message and "layer 'relu2' output" in message
    assert "layer 'fc' weight: the range [-32768, 32767]" in message
    assert "exactly int8 [-128, 127] or uint8 [0, 255]" in message
    assert list(tmp_path.iterdir()) == []
    assert model.training and all(module.training for module in model.modules())


@pytest.mark.parametrize("algorithm", ["dorefa", "bnn"])
def test_dorefa_and_bnn_are_refused(tmp_path, algorithm):
    model = nn.Sequential(nn.Linear(12, 10), nn.Hardtanh())
    if algorithm == "dorefa":
        quantizer = DoReFaQuantizer(model, [{"q_bits": 8, "op_types": ["Linear"]}])
        expected = "layer '0' weight: DoReFa's 8-bit weights"
    else:
        quantizer = BNNQuantizer(model, [{"quant_types": ["weight"], "op_types": ["Linear"]},
                                         {"quant_types": ["output"], "op_types": ["Hardtanh"]}])
        expected = "layer '1' output: BNN's binarization"
    quantizer.compress()
    with pytest.raises(ValueError, match=expected) as error:
        quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "m.onnx", input_shape=(1, 12))
    # the list is generated from the classes that declare exports_onnx_qdq, LsqQuantizer included
    assert "form; allowed: LsqQuantizer, NaiveQuantizer and QAT_Quantizer models" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_input_shape_is_required(tmp_path):
    _, quantizer = trained(nn.Sequential(nn.Linear(12, 10)), [{"quant_types": ["weight"], "op_types": ["Linear"]}],
                           input_shape=(1, 12), steps=1)
    with pytest.raises(ValueError, match="needs input_shape"):
        quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "m.onnx")
    for bad in [(1, 0), (), "1, 12", (1.0, 12), 12]:
        with pytest.raises(ValueError, match="input_shape=.*positive ints"):
            quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "m.onnx", input_shape=bad)
    assert list(tmp_path.iterdir()) == []


def test_mixed_training_modes_are_restored_and_eval_computation_is_exported(tmp_path):
    model, quantizer = trained(SmallCNN(), cnn_config("per_channel_symmetric"), bn_folding=False)
    model.train()
    model.bn2.eval()
    before = {name: module.training for name, module in model.named_modules()}
    running_mean = model.bn1.running_mean.clone()
    steps = quantizer.steps
    quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "m.onnx", input_shape=INPUT_SHAPE)
    assert {name: module.training for name, module in model.named_modules()} == before
    assert torch.equal(model.bn1.running_mean, running_mean) and quantizer.steps == steps  # nothing trained
    # eval computation: BatchNormalization with the running statistics (no training-mode BN outputs)
    (bn,) = [n for n in Graph(tmp_path / "m.onnx").ops("BatchNormalization") if "bn1.running_mean" in n.input]
    assert len(bn.output) == 1
    model.eval()
    quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "m.onnx", input_shape=INPUT_SHAPE)
    assert not any(module.training for module in model.modules())


def test_tensors_still_float_in_eval_are_exported_in_float_with_a_warning(tmp_path):
    config = cnn_config("per_tensor_symmetric")
    config[2]["quant_start_step"] = 100  # ReLU outputs not quantized yet
    model, quantizer = trained(SmallCNN(), config)
    with pytest.warns(UserWarning) as warned:
        calibration = quantizer.export_model(tmp_path / "m.pth", onnx_path=tmp_path / "m.onnx",
                                             input_shape=INPUT_SHAPE)
    messages = sorted(str(warning.message) for warning in warned)
    assert len(messages) == 2
    assert all(f"layer 'relu{i}' output is not fake-quantized" in messages[i - 1] for i in (1, 2))
    assert all("exported in float" in message for message in messages)
    graph = Graph(tmp_path / "m.onnx")
    assert not any(name.startswith("relu") for name in graph.qdq())
    assert len(graph.qdq()) == 5
    check_ort_matches_pytorch(tmp_path / "m.onnx", model, INPUT_SHAPE, float(calibration["fc"]["output_scale"]))


def test_importing_fakequant_does_not_import_onnx():
    code = ("import sys, fakequant, fakequant.onnx_export; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxscript', 'onnxruntime')))")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "[]"
