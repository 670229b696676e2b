"""NNI's documented usage, written in this project's own words: each call works as NNI documents it, or raises an
error that says what to write instead. docs/nni.md lists every call and the test that covers it.

* NNI 1.x (the seed documents): ``Quantizer(model, config_list)`` then ``compress()``; DoReFa's ``q_bits``.
* NNI 2.x: the optimizer (and QAT's ``dummy_input``) as constructor arguments, ``quant_dtype`` / ``quant_scheme``,
  ``export_model(model_path, calibration_path, onnx_path, input_shape, device)``, ``load_calibration_config``.
* NNI 3.0: ``QATQuantizer(model, config_list, evaluator, quant_start_step=...)`` with an optimizer in the
  evaluator's place; an evaluator, ``compress(max_steps, max_epochs)`` and NNI 3.0's config keys are explained.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fakequant
from fakequant import BNNQuantizer, DoReFaQuantizer, NaiveQuantizer, QAT_Quantizer, QATQuantizer


def cnn(activation=nn.ReLU6) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), activation(),  # 0, 1, 2
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), activation(),  # 3, 4, 5
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),  # 6, 7
    )  # fmt: skip


def batches(count: int = 3):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 1, 8, 8, generator=generator), torch.randint(0, 10, (4,), generator=generator))
            for _ in range(count)]  # fmt: skip


def train(model: nn.Module, optimizer: torch.optim.Optimizer, count: int = 3) -> None:
    model.train()
    for x, y in batches(count):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def fake_quantized(model: nn.Module) -> bool:
    """Whether any parametrized weight differs from its float master (the quantization is in the forward)."""
    for module in model.modules():
        originals = getattr(getattr(module, "parametrizations", None), "weight", None)
        if originals is not None and not torch.equal(module.weight, originals.original):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# NNI 1.x, as the seed documents show it
# ---------------------------------------------------------------------------------------------


def test_nni1_naive_quantizer_compress_returns_the_model():
    model = cnn()
    compressed = NaiveQuantizer(model).compress()
    assert compressed is model and fake_quantized(model)


def test_nni1_qat_quantizer_without_optimizer():
    config_list = [
        {"quant_types": ["weight"], "quant_bits": {"weight": 8}, "op_types": ["Conv2d", "Linear"]},
        {"quant_types": ["output"], "quant_bits": 8, "quant_start_step": 7000, "op_types": ["ReLU6"]},
    ]
    model = cnn()
    quantizer = QAT_Quantizer(model, config_list)
    quantizer.compress()
    model(batches(1)[0][0])
    quantizer.step()  # without an optimizer the steps are counted by step()
    assert quantizer.steps == 1
    assert not quantizer.layers["2"].active()  # ReLU6 outputs wait for step 7000, as configured


@pytest.mark.parametrize("config_list", [
    [{"quant_types": ["weight"], "quant_bits": 8, "op_types": "default"}],
    [{"q_bits": 8, "op_types": "default"}],  # the 1.x docs' DoReFa key
])  # fmt: skip
def test_nni1_dorefa_quantizer(config_list):
    model = cnn()
    quantizer = DoReFaQuantizer(model, config_list)
    quantizer.compress()
    assert sorted(quantizer.layers) == ["0", "3", "7"] and fake_quantized(model)


def test_nni1_bnn_quantizer_with_op_names():
    configure_list = [
        {"quant_bits": 1, "quant_types": ["weight"], "op_types": ["Conv2d", "Linear"], "op_names": ["0", "3"]},
        {"quant_bits": 1, "quant_types": ["output"], "op_types": ["Hardtanh"], "op_names": ["2", "5"]},
    ]
    model = cnn(nn.Hardtanh)
    quantizer = BNNQuantizer(model, configure_list)
    model = quantizer.compress()
    out = model[:3](batches(1)[0][0])
    assert set(out.unique().tolist()) <= {-1.0, 1.0}


# ---------------------------------------------------------------------------------------------
# NNI 2.x
# ---------------------------------------------------------------------------------------------


def test_nni2_qat_quantizer_with_optimizer_and_dummy_input():
    config_list = [{
        "quant_types": ["weight", "input"], "quant_bits": {"weight": 8, "input": 8}, "op_types": ["Conv2d", "Linear"],
        "quant_start_step": 2,
    }]  # fmt: skip
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dummy_input = torch.randn(1, 1, 8, 8)
    quantizer = QAT_Quantizer(model, config_list, optimizer, dummy_input)
    quantizer.compress()
    assert quantizer.folded_pairs == {"0": "1", "3": "4"}  # found with the dummy input's help where fx cannot
    assert not quantizer.layers["7"].active()
    train(model, optimizer, 2)  # the optimizer's steps drive quant_start_step
    assert quantizer.steps == 2 and quantizer.layers["7"].active()


def test_nni2_bnn_quantizer_with_optimizer_clamps_weights():
    config_list = [{"quant_bits": 1, "quant_types": ["weight"], "op_types": ["Conv2d"]}]
    model = cnn(nn.Hardtanh)
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)  # a step large enough to leave [-1, 1]
    quantizer = BNNQuantizer(model, config_list, optimizer)
    quantizer.compress()
    train(model, optimizer, 1)
    for name in quantizer.layers:
        weight = model[int(name)].parametrizations.weight.original
        assert float(weight.detach().abs().max()) <= 1.0


def test_nni2_dorefa_quantizer_with_optimizer():
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    quantizer = DoReFaQuantizer(model, [{"quant_types": ["weight"], "quant_bits": 4, "op_types": "default"}],
                                optimizer)  # fmt: skip
    quantizer.compress()
    train(model, optimizer, 2)
    assert quantizer.steps == 2


@pytest.mark.parametrize("quant_scheme, quant_dtype", [
    ("per_channel_symmetric", "int"),
    ({"weight": "per_tensor_affine", "output": "per_tensor_affine"}, {"weight": "int", "output": "uint"}),
])  # fmt: skip
def test_nni2_quant_scheme_and_quant_dtype_keys(quant_scheme, quant_dtype):
    config_list = [{
        "quant_types": ["weight", "output"], "quant_bits": 8, "op_types": ["Linear"],
        "quant_scheme": quant_scheme, "quant_dtype": quant_dtype,
    }]  # fmt: skip
    if isinstance(quant_scheme, str):
        config_list[0]["quant_types"] = ["weight"]
    quantizer = QAT_Quantizer(cnn(), config_list, bn_folding=False)
    specs = quantizer.layer_configs["7"].specs
    assert specs["weight"].signed
    per_channel = isinstance(specs["weight"].granularity, fakequant.PerChannel)
    assert per_channel == (quant_scheme == "per_channel_symmetric")
    if "output" in specs:
        assert not specs["output"].signed and not specs["output"].symmetric


def test_nni2_export_model_positional_arguments(tmp_path):
    config_list = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    quantizer = QAT_Quantizer(model, config_list, optimizer)
    quantizer.compress()
    train(model, optimizer)
    paths = tmp_path / "model.pth", tmp_path / "calibration.pth", tmp_path / "model.onnx"
    calibration = quantizer.export_model(*paths, (1, 1, 8, 8), "cpu")
    assert all(p.exists() for p in paths)
    assert torch.load(paths[1]).keys() == calibration.keys() == {"0", "3", "7"}


def test_nni2_load_calibration_config_sets_the_activation_ranges():
    config_list = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]}]
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    quantizer = QAT_Quantizer(model, config_list, optimizer, bn_folding=False)
    quantizer.compress()
    train(model, optimizer)
    calibration = quantizer.calibration()

    def fresh_quantizer() -> QAT_Quantizer:
        fresh_model = cnn()
        fresh_model.load_state_dict(quantizer.float_state_dict())  # the trained float weights, no ranges
        fresh = QAT_Quantizer(fresh_model, config_list, bn_folding=False)
        fresh.compress()
        return fresh

    calibrated, uncalibrated = fresh_quantizer(), fresh_quantizer()
    with pytest.raises(ValueError, match=r"\['9'\] are not quantized by this quantizer"):
        calibrated.load_calibration_config({"9": {}})
    calibrated.load_calibration_config(calibration)
    for name, record in calibrated.calibration().items():
        assert record["tracked_min_input"] == calibration[name]["tracked_min_input"]
        assert torch.equal(record["input_scale"], calibration[name]["input_scale"])
    x = batches(1)[0][0]
    expected = model.eval()(x)
    assert torch.equal(calibrated.bound_model.eval()(x), expected)
    assert not torch.equal(uncalibrated.bound_model.eval()(x), expected)  # its inputs stay float in eval


# ---------------------------------------------------------------------------------------------
# NNI 3.0
# ---------------------------------------------------------------------------------------------


def test_nni3_qat_quantizer_takes_an_optimizer_and_quant_start_step():
    config_list = [{"quant_types": ["weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
                   {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear"], "quant_start_step": 0}]
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    quantizer = QATQuantizer(model, config_list, optimizer, quant_start_step=2)
    assert {name: c.quant_start_step for name, c in quantizer.layer_configs.items()} == {"0": 2, "3": 2, "7": 0}
    quantizer.compress()
    train(model, optimizer, 2)
    assert all(layer.active() for layer in quantizer.layers.values())
    with pytest.raises(ValueError, match=r"quant_start_step=-1; allowed: None or an int >= 0"):
        QATQuantizer(cnn(), config_list, quant_start_step=-1)


def test_nni3_evaluator_is_explained():
    import nni
    from nni.compression.utils import TorchEvaluator

    model = cnn()
    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    evaluator = TorchEvaluator(lambda *args: None, optimizer, lambda batch, model: None)
    config_list = [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]}]
    with pytest.raises(ValueError, match=r"NNI evaluator \(TorchEvaluator\).*pass the optimizer the evaluator was "
                                         r"built with, QAT_Quantizer\(model, config_list, optimizer\)"):
        QATQuantizer(model, config_list, evaluator, quant_start_step=0)


def test_nni3_compress_with_training_arguments_is_explained():
    quantizer = QATQuantizer(cnn(), [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]}])
    with pytest.raises(ValueError, match=r"compress\(\) takes no arguments.*train with your own loop"):
        quantizer.compress(100, None)
    quantizer.compress()  # the error changed nothing


@pytest.mark.parametrize("entry, hint", [
    ({"op_types": ["Conv2d"], "target_names": ["weight"]}, r"NNI 3.0's config format.*quant_types"),
    ({"op_types": ["Conv2d"], "quant_types": ["weight"], "granularity": "out_channel"},
     r"NNI 3.0's 'out_channel' is written granularity 'per_channel'"),
    ({"op_types": ["Conv2d"], "quant_types": ["weight"], "quant_dtype": "int8"},
     r"NNI 3.0's 'int8' is written quant_dtype 'int' with quant_bits 8"),
    ({"op_types": ["Conv2d"], "quant_types": ["weight"], "quant_scheme": "symmetric"},
     r"NNI 3.0's 'symmetric' is written quant_scheme 'per_tensor_symmetric'"),
])  # fmt: skip
def test_nni3_config_keys_and_values_are_explained(entry, hint):
    with pytest.raises(ValueError, match=hint):
        QATQuantizer(cnn(), [entry])
