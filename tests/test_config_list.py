"""config_list parsing and validation (docs/numerics.md, Quantizers and config_list): selection, overrides, NNI
2.x keys and every error path; the granularities and format specs it resolves to."""

import pytest
import torch
from torch import nn

import fakequant
from fakequant import PerChannel, PerGroup, PerTensor, QuantSpec
from fakequant.qparams import FormatSpec, Granularity
from fakequant.quantizers.config import DEFAULT_OP_TYPES


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.relu1 = nn.ReLU6()
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.relu2 = nn.ReLU6()
        self.conv1d = nn.Conv1d(1, 1, 1)
        self.tconv = nn.ConvTranspose2d(4, 2, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.tconv(x).flatten(1)[:, :16])


def configs(config_list, cls=fakequant.QAT_Quantizer, model=None):
    return cls(model or Net(), config_list).layer_configs


def test_op_types_select_by_class_name_and_default_expands_to_weighted_layers():
    assert set(configs([{"quant_types": ["weight"], "op_types": ["Conv2d"]}])) == {"conv1", "conv2"}
    selected = configs([{"quant_types": ["weight"], "op_types": "default"}])
    assert set(selected) == {"conv1", "conv2", "conv1d", "fc"}
    assert set(DEFAULT_OP_TYPES) == {"Conv1d", "Conv2d", "Conv3d", "Linear"}


def test_op_names_and_op_types_together_select_the_intersection():
    selected = configs([{"quant_types": ["weight"], "op_types": ["Conv2d"], "op_names": ["conv2"]}])
    assert set(selected) == {"conv2"}


def test_later_entry_overrides_earlier_for_the_same_module_as_a_whole():
    selected = configs([
        {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]},
        {"quant_types": ["weight", "output"], "quant_bits": {"weight": 4, "output": 6}, "op_names": ["conv2"]},
    ])
    assert selected["conv1"].quant_types == ("weight",) and selected["conv1"].bits("weight") == 8
    assert selected["conv2"].quant_types == ("weight", "output")
    assert selected["conv2"].bits("weight") == 4 and selected["conv2"].bits("output") == 6
    assert selected["conv2"].entry_index == 1


def test_exclude_removes_modules_and_a_later_entry_can_reinclude():
    selected = configs([
        {"quant_types": ["weight"], "op_types": ["default"]},
        {"exclude": True, "op_names": ["fc", "conv1"]},
    ])
    assert set(selected) == {"conv2", "conv1d"}
    selected = configs([
        {"exclude": True, "op_names": ["fc"]},
        {"quant_types": ["weight"], "op_types": ["Linear"]},
    ])
    assert set(selected) == {"fc"}


def test_quant_bits_int_is_shared_by_all_quant_types():
    layer = configs([{"quant_types": ["weight", "output"], "quant_bits": 5, "op_names": ["conv1"]}])["conv1"]
    assert layer.bits("weight") == 5 and layer.bits("output") == 5


def test_defaults_weight_int_symmetric_per_tensor_activation_uint_affine():
    layer = configs([{"quant_types": ["weight", "input", "output"], "op_names": ["conv1"]}])["conv1"]
    weight, output = layer.specs["weight"], layer.specs["output"]
    assert (weight.bits, weight.signed, weight.symmetric, weight.granularity) == (8, True, True, PerTensor())
    assert (output.bits, output.signed, output.symmetric) == (8, False, False)
    assert layer.quant_start_step == 0


def test_nni2_quant_scheme_and_dtype_string_or_dict():
    layer = configs([{
        "quant_types": ["weight", "output"],
        "quant_scheme": {"weight": "per_channel_symmetric", "output": "per_tensor_symmetric"},
        "quant_dtype": "int",
        "op_names": ["conv1"],
    }])["conv1"]
    assert layer.specs["weight"].granularity == PerChannel(0) and layer.specs["weight"].symmetric
    assert layer.specs["output"].symmetric and layer.specs["output"].signed
    layer = configs([{"quant_types": ["weight"], "quant_scheme": "per_tensor_affine", "quant_dtype": "uint",
                      "op_names": ["fc"]}])["fc"]
    assert not layer.specs["weight"].symmetric and not layer.specs["weight"].signed


def test_per_channel_conv_transpose_uses_axis_1():
    layer = configs([{"quant_types": ["weight"], "quant_scheme": "per_channel_affine",
                      "op_names": ["tconv"]}])["tconv"]
    assert layer.specs["weight"].granularity == PerChannel(1)


def test_dorefa_q_bits_alias_and_default_quant_types():
    layer = configs([{"q_bits": 3, "op_types": "default"}], fakequant.DoReFaQuantizer)["fc"]
    assert layer.quant_types == ("weight",) and layer.bits("weight") == 3


def test_naive_needs_no_config():
    assert set(fakequant.NaiveQuantizer(Net()).layer_configs) == {"conv1", "conv2", "conv1d", "fc"}


def test_bnn_defaults_to_one_bit():
    layer = configs([{"quant_types": ["weight"], "op_types": ["Linear"]}], fakequant.BNNQuantizer)["fc"]
    assert layer.bits("weight") == 1


# ------------------------------------------------------------------------------------------------
# Errors: each names the entry index, the key, the value and what is allowed.
# ------------------------------------------------------------------------------------------------

GOOD = {"quant_types": ["weight"], "op_types": ["Conv2d"]}


@pytest.mark.parametrize(
    "entry, key, value_text, allowed_text",
    [
        ({**GOOD, "quant_bit": 8}, "'quant_bit'", "8", "allows: quant_types"),
        ({**GOOD, "quant_bits": 0}, "'quant_bits'", "0", "an int from 2 to 16"),
        ({**GOOD, "quant_bits": 17}, "'quant_bits'", "17", "an int from 2 to 16"),
        ({**GOOD, "quant_bits": 8.0}, "'quant_bits'", "8.0", "an int from 2 to 16"),
        ({**GOOD, "quant_bits": True}, "'quant_bits'", "True", "an int from 2 to 16"),
        ({**GOOD, "quant_bits": {"output": 8}}, "'quant_bits'", "{'output': 8}", "dict keys among"),
        ({"quant_types": ["weight", "output"], "quant_bits": {"weight": 8}, "op_types": ["Conv2d"]},
         "'quant_bits'", "{'weight': 8}", "missing ['output']"),
        ({**GOOD, "quant_types": ["weights"]}, "'quant_types'", "['weights']", "'weight', 'input', 'output'"),
        ({**GOOD, "quant_types": []}, "'quant_types'", "[]", "non-empty list of strings"),
        ({**GOOD, "quant_types": ["weight", "weight"]}, "'quant_types'", "['weight', 'weight']", "at most once"),
        ({**GOOD, "op_types": ["Conv2D"]}, "'op_types'", "['Conv2D']", "a torch.nn module class name"),
        ({**GOOD, "op_types": [3]}, "'op_types'", "[3]", "a string or a non-empty list of strings"),
        ({**GOOD, "op_names": ["conv3"]}, "'op_names'", "['conv3']", "'conv3' matches no module"),
        ({**GOOD, "op_names": ["fc"]}, "'op_names'", "['fc']", "'fc' is a Linear, so it matches nothing"),
        ({**GOOD, "exclude": "yes"}, "'exclude'", "'yes'", "True or False"),
        ({**GOOD, "quant_start_step": -1}, "'quant_start_step'", "-1", "an int >= 0"),
        ({**GOOD, "quant_scheme": "per_tensor"}, "'quant_scheme'", "'per_tensor'", "per_tensor_affine"),
        ({"quant_types": ["output"], "quant_scheme": "per_channel_affine", "op_types": ["ReLU6"]},
         "'quant_scheme'", "'per_channel_affine'", "per-channel is for weights"),
        ({**GOOD, "quant_dtype": "int8"}, "'quant_dtype'", "'int8'", "['int', 'uint']"),
        ({**GOOD, "q_bits": 8}, "'q_bits'", "8", "allows:"),
    ],
)
def test_bad_entry_raises_naming_index_key_value_and_allowed(entry, key, value_text, allowed_text):
    config_list = [{"quant_types": ["weight"], "op_types": ["Linear"]}, entry]
    with pytest.raises(ValueError) as info:
        fakequant.QAT_Quantizer(Net(), config_list)
    message = str(info.value)
    assert "config_list[1]" in message
    assert key in message and value_text in message and allowed_text in message


def test_entry_without_op_types_or_op_names_is_an_error():
    with pytest.raises(ValueError, match=r"config_list\[0\].*neither 'op_types' nor 'op_names'"):
        fakequant.QAT_Quantizer(Net(), [{"quant_types": ["weight"]}])


def test_entry_must_be_a_dict_and_config_list_a_list():
    with pytest.raises(ValueError, match=r"config_list\[0\]: each entry must be a dict"):
        fakequant.QAT_Quantizer(Net(), ["weight"])
    with pytest.raises(ValueError, match="config_list must be a list of dicts"):
        fakequant.QAT_Quantizer(Net(), {"quant_types": ["weight"], "op_types": ["Linear"]})
    with pytest.raises(ValueError, match="config_list is required"):
        fakequant.QAT_Quantizer(Net())


def test_weight_on_a_module_without_weight_is_an_error():
    with pytest.raises(ValueError, match=r"config_list\[0\].*'relu1' \(ReLU6\), which has no floating-point"):
        fakequant.QAT_Quantizer(Net(), [{"quant_types": ["weight"], "op_types": ["ReLU6"]}])


def test_bnn_bits_other_than_one_is_an_error():
    with pytest.raises(ValueError, match=r"config_list\[0\]: key 'quant_bits' has value 2; allowed: an int from 1 "):
        fakequant.BNNQuantizer(Net(), [{"quant_bits": 2, "quant_types": ["weight"], "op_types": ["Conv2d"]}])


def test_per_algorithm_keys_and_types():
    with pytest.raises(ValueError, match="unknown key 'quant_scheme'.*DoReFaQuantizer allows"):
        fakequant.DoReFaQuantizer(Net(), [{"q_bits": 8, "op_types": "default", "quant_scheme": "per_tensor_affine"}])
    with pytest.raises(ValueError, match=r"key 'quant_types' has value \['output'\]; allowed: a list drawn from "
                                         r"\['weight'\] \(NaiveQuantizer\)"):
        fakequant.NaiveQuantizer(Net(), [{"quant_types": ["output"], "op_types": ["ReLU6"]}])
    with pytest.raises(ValueError, match="'q_bits'.*or 'quant_bits', not both"):
        fakequant.DoReFaQuantizer(Net(), [{"q_bits": 8, "quant_bits": 8, "op_types": "default"}])


def test_bad_optimizer_and_model():
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer"):
        fakequant.QAT_Quantizer(Net(), [GOOD], optimizer="sgd")
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        fakequant.QAT_Quantizer(torch.zeros(1), [GOOD])


def test_entry_matching_no_module_warns():
    with pytest.warns(UserWarning, match=r"config_list\[1\] matches no module of the model \(op_types \['ReLU'\]\)"):
        configs([GOOD, {"quant_types": ["output"], "op_types": ["ReLU"]}])


def test_granularities_declare_what_the_callers_read():
    cases = [(PerTensor(), "per_tensor", None, None, (), None),
             (PerChannel(1), "per_channel", 1, None, (32,), 1),
             (PerChannel(-4), "per_channel", -4, None, (8,), 0),
             (PerGroup(16), "per_group", None, 16, (8, 2), None)]
    for granularity, config_name, axis, group_size, scale_shape, axis_for in cases:
        assert isinstance(granularity, Granularity)
        assert (granularity.config_name, granularity.axis, granularity.group_size) == (config_name, axis, group_size)
        assert granularity.scale_shape((8, 32, 1, 1)) == scale_shape
        assert granularity.axis_for(4) == axis_for
    with pytest.raises(TypeError):
        Granularity()  # abstract: a granularity is one of its subclasses
    with pytest.raises(TypeError):
        PerGroup()  # group_size has no default, even though the base declares it
    # a config_list names the granularities that need no argument by their config_name
    layer = configs([{"quant_types": ["weight"], "op_names": ["fc"], "granularity": PerChannel.config_name}])["fc"]
    assert layer.specs["weight"].granularity == PerChannel(0)


def test_quant_spec_is_the_integer_format_spec():
    spec = configs([{"quant_types": ["weight"], "op_names": ["tconv"], "quant_scheme": "per_channel_affine"}])[
        "tconv"].specs["weight"]
    assert isinstance(spec, FormatSpec) and type(spec) is QuantSpec
    assert spec.calibration_record("weight") == {"weight_bits": 8, "weight_quant_min": -128, "weight_quant_max": 127,
                                                 "weight_symmetric": False, "weight_axis": 1}
    with pytest.raises(TypeError):
        FormatSpec()
