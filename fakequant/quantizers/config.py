"""Parsing and validation of NNI-style ``config_list`` entries (docs/numerics.md, Quantizers and config_list).

Every entry is checked when the quantizer is built, and a mistake raises a ``ValueError`` that names the
entry index, the key, the value given and what is allowed. Entries are then resolved per module: as in
NNI's ``select_config``, the last entry that matches a module wins as a whole (a later entry overrides an
earlier one for the same module), and a winning ``exclude`` entry leaves the module unquantized.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fakequant.qparams import (
    FLOAT_QUANT_DTYPES,
    FloatSpec,
    FormatSpec,
    Granularity,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantSpec,
)

__all__ = [
    "QUANT_TYPES",
    "QUANT_SCHEMES",
    "QUANT_DTYPES",
    "FLOAT_QUANT_DTYPES",
    "DEFAULT_OP_TYPES",
    "AlgorithmRules",
    "LayerConfig",
    "resolve_config_list",
    "check_activation_blocks",
]

QUANT_TYPES = ("weight", "input", "output")
QUANT_SCHEMES = ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric")
QUANT_DTYPES = ("int", "uint")  # the integer formats; the float ones are FLOAT_QUANT_DTYPES (fakequant.qparams)
# 'default' stands for the weighted layers (docs/numerics.md, Quantizers and config_list).
DEFAULT_OP_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")
COMMON_KEYS = ("quant_types", "quant_bits", "op_types", "op_names", "exclude", "quant_start_step")


@dataclass(frozen=True)
class AlgorithmRules:
    """What one quantizer accepts in its config_list.

    Args:
        name: the quantizer's class name, used in error messages.
        keys: the config keys accepted besides :data:`COMMON_KEYS`.
        quant_types: the quant types the algorithm implements.
        min_bits: the smallest width accepted.
        max_bits: the largest width accepted.
        default_bits: the width used when an entry gives none.
        default_specs: the QuantSpec of each quant type when the entry gives no scheme or dtype.
        float_dtypes: the float formats (:data:`~fakequant.qparams.FLOAT_QUANT_DTYPES`) ``quant_dtype`` may name.
        float_dtypes_note: why the others are refused, for the error message.
    """

    name: str
    keys: tuple[str, ...]
    quant_types: tuple[str, ...]
    min_bits: int
    max_bits: int
    default_bits: int
    default_specs: Mapping[str, QuantSpec]
    float_dtypes: tuple[str, ...] = ()
    float_dtypes_note: str = ""


@dataclass
class LayerConfig:
    """The resolved configuration of one module.

    Attributes:
        name: qualified module name (``""`` is the root module).
        op_type: the module's class name.
        entry_index: index of the config_list entry that selected the module.
        quant_types: the quant types applied, in config order.
        specs: the format spec of each quant type: a :class:`~fakequant.qparams.QuantSpec` (integer formats) or a
            :class:`~fakequant.qparams.FloatSpec` (FP8, MX, NVFP4).
        quant_start_step: fake quantization starts once this many steps have been taken.
    """

    name: str
    op_type: str
    entry_index: int
    quant_types: tuple[str, ...]
    specs: dict[str, FormatSpec] = field(default_factory=dict)
    quant_start_step: int = 0

    def bits(self, quant_type: str) -> int:
        return self.specs[quant_type].bits


def _fail(index: int, key: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"config_list[{index}]: key {key!r} has value {value!r}; allowed: {allowed}")


def _as_str_list(index: int, key: str, value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise _fail(index, key, value, "a string or a non-empty list of strings")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _known_op_types(model: nn.Module) -> set[str]:
    names = {"default"}
    names.update(type(m).__name__ for m in model.modules())
    names.update(
        n for n, obj in vars(nn).items() if isinstance(obj, type) and issubclass(obj, nn.Module)
    )
    return names


def _per_type(index: int, key: str, value: object, quant_types: list[str], check,
              optional: Sequence[str] = ()) -> dict[str, object]:  # fmt: skip
    """Expands an int/str setting or a dict keyed by quant type to one value per quant type (``optional``: the
    quant types a ``quant_bits`` dict may leave out, those with a float format)."""
    if isinstance(value, Mapping):
        extra = [t for t in value if t not in quant_types]
        if extra:
            raise _fail(index, key, value, f"dict keys among the entry's quant_types {quant_types}")
        missing = [t for t in quant_types if t not in value and t not in optional]
        if missing and key == "quant_bits":
            raise _fail(index, key, value, f"a width for every quant type in {quant_types} (missing {missing})")
        out = {}
        for quant_type, item in value.items():
            check(index, key, value, item, quant_type)
            out[quant_type] = item
        return out
    for quant_type in quant_types:
        check(index, key, value, value, quant_type)
    return {quant_type: value for quant_type in quant_types}


GRANULARITY_ALLOWED = (
    "fakequant.PerTensor(), PerChannel(0), PerGroup(group_size) or an int group size, 'per_tensor' or 'per_channel' "
    "(weights; inputs and outputs are per tensor; PerBlock(n) or an int n for a float quant_dtype), or a dict "
    "{'weight': ...}"
)


# The granularities a config_list may name by their config_name alone (PerChannel() is along axis 0).
_NAMED_GRANULARITIES = {cls.config_name: cls for cls in (PerTensor, PerChannel)}


def _parse_granularity(index: int, value: object) -> Granularity:
    if isinstance(value, Granularity):
        return value
    if isinstance(value, str) and value in _NAMED_GRANULARITIES:
        return _NAMED_GRANULARITIES[value]()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return PerGroup(value)
    raise _fail(index, "granularity", value, GRANULARITY_ALLOWED + _nni3_hint(value))


def _weight_granularity(index: int, entry: Mapping) -> Granularity | None:
    """The ``granularity`` key: the weight's granularity (it overrides the per-tensor/per-channel part of
    ``quant_scheme``; the symmetry stays the scheme's)."""
    if "granularity" not in entry:
        return None
    value = entry["granularity"]
    if isinstance(value, Mapping):
        if set(value) - {"weight"}:
            raise _fail(index, "granularity", value, "a dict with the key 'weight' only (inputs and outputs are "
                        "quantized per tensor)")  # fmt: skip
        if "weight" not in value:
            return None
        value = value["weight"]
    granularity = _parse_granularity(index, value)
    quant_types = entry.get("quant_types", ["weight"])
    if "weight" not in (quant_types if isinstance(quant_types, (list, tuple)) else [quant_types]):
        raise _fail(index, "granularity", entry["granularity"], "an entry whose quant_types include 'weight'")
    return granularity


def _spec_for(rules: AlgorithmRules, quant_type: str, bits: int, scheme: str | None, dtype: str | None,
              granularity_override: Granularity | None = None) -> QuantSpec:  # fmt: skip
    default = rules.default_specs[quant_type]
    symmetric, granularity = default.symmetric, default.granularity
    if scheme is not None:
        symmetric = scheme.endswith("symmetric")
        granularity = PerChannel(0) if scheme.startswith("per_channel") else PerTensor()
    if granularity_override is not None and quant_type == "weight":
        granularity = granularity_override
    signed = default.signed if dtype is None else dtype == "int"
    narrow_range = default.narrow_range and signed and bits >= 2
    return QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range,
                     granularity=granularity)


def _block_sizes(index: int, entry: Mapping, quant_types: list[str], float_types: list[str],
                 rules: AlgorithmRules) -> dict[str, int]:  # fmt: skip
    """The ``block_size`` key: an int for every quant type with a float format, or a dict per quant type."""
    value = entry["block_size"]

    def check(index, key, whole, size, quant_type):
        if not _is_int(size) or size < 1:
            raise _fail(index, key, whole, "an int >= 1 (elements per scale along the blocked dimension), or a dict "
                                           "{quant_type: int}")  # fmt: skip
        if quant_type not in float_types:
            raise _fail(index, key, whole, f"a block size for quant types whose quant_dtype is a float format "
                                           f"{list(rules.float_dtypes)}; {quant_type!r} is an integer format "
                                           "(integer weights group input channels with 'granularity')")  # fmt: skip

    if isinstance(value, Mapping):
        return _per_type(index, "block_size", value, quant_types, check)
    if not float_types:
        raise _fail(index, "block_size", value,
                    f"a block size for an entry with a float quant_dtype {list(rules.float_dtypes)}; this entry's "
                    "formats are integer")  # fmt: skip
    for quant_type in float_types:
        check(index, "block_size", value, value, quant_type)
    return {quant_type: value for quant_type in float_types}


def _float_spec_for(index: int, entry: Mapping, quant_type: str, dtype: str, given_bits: int | None,
                    scheme: str | None, weight_granularity: Granularity | None,
                    block_size: int | None) -> FloatSpec:  # fmt: skip
    """The FloatSpec of one quant type: the format's width and default blocks, changed by the keys that may."""
    kind, _, width = FLOAT_QUANT_DTYPES[dtype]
    if given_bits is not None and given_bits != width:
        raise _fail(index, "quant_bits", entry["quant_bits"], f"{width} for {quant_type!r}, or no quant_bits: "
                                                              f"quant_dtype {dtype!r} fixes the width")  # fmt: skip
    granularity = None
    if scheme is not None:
        if kind != "fp8":
            raise _fail(index, "quant_scheme", entry["quant_scheme"],
                        f"no quant_scheme for {quant_type!r}: quant_dtype {dtype!r} has a scale per block (its size "
                        "is the 'block_size' key); the FP8 formats take 'per_tensor_symmetric' or "
                        "'per_channel_symmetric'")  # fmt: skip
        if not scheme.endswith("_symmetric"):
            raise _fail(index, "quant_scheme", entry["quant_scheme"],
                        f"'per_tensor_symmetric' or 'per_channel_symmetric' for {quant_type!r}: quant_dtype {dtype!r} "
                        "has no zero point")  # fmt: skip
        granularity = PerChannel(0) if scheme.startswith("per_channel") else PerTensor()
    if quant_type == "weight" and weight_granularity is not None:
        # an int n (PerGroup(n)) is n input channels per scale: for a float format, blocks of n along them
        granularity = (PerBlock(weight_granularity.group_size) if isinstance(weight_granularity, PerGroup)
                       else weight_granularity)  # fmt: skip
        if kind != "fp8" and not isinstance(granularity, PerBlock):
            raise _fail(index, "granularity", entry["granularity"],
                        f"PerBlock(n) or an int n for the weight: quant_dtype {dtype!r} has a scale per block (or "
                        "the 'block_size' key)")  # fmt: skip
    if block_size is not None:
        if quant_type == "weight" and weight_granularity is not None and granularity != PerBlock(block_size):
            raise _fail(index, "block_size", entry["block_size"],
                        f"either 'block_size' or 'granularity' for the weight, or both saying the same (granularity "
                        f"is {granularity!r})")  # fmt: skip
        granularity = PerBlock(block_size)
    return FloatSpec(dtype, granularity)


# NNI 3.0's config_list keys, which fakequant does not read: each names what to write instead (NNI 2.x's keys).
NNI3_KEYS = {
    "target_names": "quant_types (['weight', 'input', 'output'] for target_names ['weight', '_input_', '_output_'])",
    "target_settings": "one entry per quant type with quant_types, quant_bits, quant_dtype and quant_scheme",
    "op_names_re": "op_names (exact qualified module names)",
    "fuse_names": "nothing: QAT_Quantizer finds and folds Conv+BN pairs itself (bn_folding=True)",
}
# NNI 3.0's values of quant_dtype / quant_scheme, and the NNI 2.x spelling fakequant reads.
NNI3_VALUES = {
    "int8": "quant_dtype 'int' with quant_bits 8", "uint8": "quant_dtype 'uint' with quant_bits 8",
    "int4": "quant_dtype 'int' with quant_bits 4", "uint4": "quant_dtype 'uint' with quant_bits 4",
    "int2": "quant_dtype 'int' with quant_bits 2", "uint2": "quant_dtype 'uint' with quant_bits 2",
    "affine": "quant_scheme 'per_tensor_affine' (or 'per_channel_affine' for weights)",
    "symmetric": "quant_scheme 'per_tensor_symmetric' (or 'per_channel_symmetric' for weights)",
    "out_channel": "granularity 'per_channel' (or quant_scheme 'per_channel_*')",
    "per_channel": "granularity 'per_channel'",
    "default": "granularity 'per_tensor'",
    "in_channel": "granularity PerGroup(group_size) (groups of input channels)",
}  # fmt: skip


def _nni3_hint(value: object) -> str:
    return f" (NNI 3.0's {value!r} is written {NNI3_VALUES[value]})" if isinstance(value, str) and (
        value in NNI3_VALUES) else ""


def _validate_entry(index: int, entry: object, rules: AlgorithmRules, known_types: set[str],
                    modules: dict[str, nn.Module]) -> dict:
    """Checks one entry and returns it normalised (lists for op_types/op_names/quant_types)."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"config_list[{index}]: each entry must be a dict, got {type(entry).__name__} {entry!r}")
    allowed_keys = COMMON_KEYS + rules.keys
    for key in entry:
        if key not in allowed_keys and key in NNI3_KEYS:
            raise ValueError(
                f"config_list[{index}]: key {key!r} (value {entry[key]!r}) is NNI 3.0's config format, which "
                f"fakequant does not read; write NNI 2.x's keys instead: {NNI3_KEYS[key]}"
            )
        if key not in allowed_keys:
            raise ValueError(
                f"config_list[{index}]: unknown key {key!r} (value {entry[key]!r}); "
                f"{rules.name} allows: {', '.join(allowed_keys)}"
            )
    if "op_types" not in entry and "op_names" not in entry:
        raise ValueError(
            f"config_list[{index}]: entry {dict(entry)!r} has neither 'op_types' nor 'op_names'; "
            "allowed: at least one of them, to say which modules it applies to"
        )
    out: dict = {"index": index}
    if "exclude" in entry and not isinstance(entry["exclude"], bool):
        raise _fail(index, "exclude", entry["exclude"], "True or False")
    out["exclude"] = entry.get("exclude", False)

    op_types = None
    if "op_types" in entry:
        op_types = _as_str_list(index, "op_types", entry["op_types"])
        for op_type in op_types:
            if op_type not in known_types:
                raise _fail(
                    index, "op_types", entry["op_types"],
                    f"'default' ({', '.join(DEFAULT_OP_TYPES)}), a torch.nn module class name or the class "
                    f"name of a module in the model ({op_type!r} is neither)",
                )
        expanded = set()
        for op_type in op_types:
            expanded.update(DEFAULT_OP_TYPES if op_type == "default" else (op_type,))
        op_types = expanded
    out["op_types"] = op_types

    op_names = None
    if "op_names" in entry:
        op_names = _as_str_list(index, "op_names", entry["op_names"])
        for op_name in op_names:
            if op_name not in modules:
                raise _fail(index, "op_names", entry["op_names"],
                            f"qualified names of modules in the model ({op_name!r} matches no module)")
            if op_types is not None and type(modules[op_name]).__name__ not in op_types:
                raise _fail(
                    index, "op_names", entry["op_names"],
                    f"names of modules whose type is in op_types {sorted(op_types)} ({op_name!r} is a "
                    f"{type(modules[op_name]).__name__}, so it matches nothing)",
                )
    out["op_names"] = set(op_names) if op_names is not None else None

    if "quant_types" in entry:
        quant_types = _as_str_list(index, "quant_types", entry["quant_types"])
        for quant_type in quant_types:
            if quant_type not in rules.quant_types:
                raise _fail(index, "quant_types", entry["quant_types"],
                            f"a list drawn from {list(rules.quant_types)} ({rules.name})")
        if len(set(quant_types)) != len(quant_types):
            raise _fail(index, "quant_types", entry["quant_types"], "each quant type at most once")
    else:
        # DoReFa's documented {'q_bits': 8, 'op_types': 'default'} quantizes weights only.
        quant_types = ["weight"]
    out["quant_types"] = quant_types

    def check_scheme(index, key, whole, scheme, quant_type):
        if scheme not in QUANT_SCHEMES:
            raise _fail(index, key, whole, f"one of {list(QUANT_SCHEMES)} or a dict {{quant_type: scheme}}"
                                           + _nni3_hint(scheme))
        if scheme.startswith("per_channel") and quant_type != "weight":
            raise _fail(index, key, whole, f"per-tensor schemes for {quant_type!r} (per-channel is for weights)")

    def check_dtype(index, key, whole, dtype, quant_type):
        if dtype not in QUANT_DTYPES + rules.float_dtypes:
            floats = f", or a float format {list(rules.float_dtypes)}" if rules.float_dtypes else ""
            refused = (f" ({rules.name} does not take {dtype!r}{rules.float_dtypes_note})"
                       if dtype in FLOAT_QUANT_DTYPES else "")  # fmt: skip
            raise _fail(index, key, whole, f"one of {list(QUANT_DTYPES)}{floats}, or a dict {{quant_type: dtype}}"
                                           + refused + _nni3_hint(dtype))

    # The dtypes first: a float format fixes its width, so quant_bits may leave those quant types out.
    schemes = _per_type(index, "quant_scheme", entry["quant_scheme"], quant_types, check_scheme) if (
        "quant_scheme" in entry) else {}
    dtypes = _per_type(index, "quant_dtype", entry["quant_dtype"], quant_types, check_dtype) if (
        "quant_dtype" in entry) else {}
    float_types = [t for t in quant_types if dtypes.get(t) in FLOAT_QUANT_DTYPES]

    def check_bits(index, key, whole, bits, quant_type):
        if not _is_int(bits) or not rules.min_bits <= bits <= rules.max_bits:
            span = str(rules.min_bits) if rules.min_bits == rules.max_bits else (
                f"{rules.min_bits} to {rules.max_bits}")
            raise _fail(index, key, whole, f"an int from {span} for {rules.name}, or a dict "
                                           f"{{quant_type: int}} (bad width {bits!r} for {quant_type!r})")

    if "quant_bits" in entry and "q_bits" in entry:
        raise _fail(index, "q_bits", entry["q_bits"], "'q_bits' (the weight width) or 'quant_bits', not both")
    if "q_bits" in entry:
        check_bits(index, "q_bits", entry["q_bits"], entry["q_bits"], "weight")
        given_bits = {t: (entry["q_bits"] if t == "weight" else rules.default_bits) for t in quant_types}
    elif "quant_bits" in entry:
        given_bits = _per_type(index, "quant_bits", entry["quant_bits"], quant_types, check_bits, float_types)
    else:
        given_bits = {}
    bits = {t: given_bits.get(t, rules.default_bits) for t in quant_types}

    if "quant_start_step" in entry:
        step = entry["quant_start_step"]
        if not _is_int(step) or step < 0:
            raise _fail(index, "quant_start_step", step, "an int >= 0")
    out["quant_start_step"] = entry.get("quant_start_step", 0)

    weight_granularity = _weight_granularity(index, entry) if "granularity" in rules.keys else None
    block_sizes = _block_sizes(index, entry, quant_types, float_types, rules) if "block_size" in entry else {}
    specs = {}
    for quant_type in quant_types:
        if quant_type in float_types:
            specs[quant_type] = _float_spec_for(index, entry, quant_type, dtypes[quant_type],
                                                given_bits.get(quant_type), schemes.get(quant_type),
                                                weight_granularity, block_sizes.get(quant_type))  # fmt: skip
            continue
        if quant_type == "weight" and isinstance(weight_granularity, PerBlock):
            raise _fail(index, "granularity", entry["granularity"],
                        "PerTensor(), PerChannel(0) or PerGroup(n) for an integer weight (PerBlock(n) is for a float "
                        f"quant_dtype: {list(rules.float_dtypes)})")  # fmt: skip
        try:
            specs[quant_type] = _spec_for(rules, quant_type, bits[quant_type], schemes.get(quant_type),
                                          dtypes.get(quant_type), weight_granularity)
        except ValueError as error:
            raise _fail(index, "quant_bits", entry.get("quant_bits", entry.get("q_bits")),
                        f"a width that {quant_type!r} with this scheme/dtype supports ({error})") from None
    out["bits"] = {t: specs[t].bits for t in quant_types}
    out["specs"] = specs
    return out


def _check_group_layout(config: LayerConfig, name: str, module: nn.Module, group_size: int) -> None:
    shape = tuple(module.weight.shape)
    per_group_layout = len(shape) >= 2 and all(d == 1 for d in shape[2:]) and not isinstance(
        module, nn.modules.conv._ConvTransposeNd)  # fmt: skip
    if not per_group_layout:
        raise ValueError(
            f"config_list[{config.entry_index}]: key 'granularity' has value PerGroup(group_size={group_size}) but "
            f"module {name!r} ({config.op_type}) has a weight of shape {shape}; allowed: per-group weights on "
            "Linear and 1x1 Conv layers, PerTensor()/PerChannel(0) elsewhere"
        )
    if shape[1] % group_size != 0:
        raise ValueError(
            f"config_list[{config.entry_index}]: key 'granularity' has value PerGroup(group_size={group_size}) but "
            f"module {name!r} ({config.op_type}) has {shape[1]} input channels, not a multiple of {group_size}; "
            "allowed: a group size that divides the input channels of every module the entry selects"
        )


def _block_size_text(spec: FloatSpec, quant_type: str) -> str:
    size = spec.granularity.block_size
    default = f", whose default block size is {size}" if size == spec.default_block_size else ""
    return f"key 'block_size' has value {size} for {quant_type!r} (quant_dtype {spec.quant_dtype!r}{default})"


def _resolve_weight_blocks(config: LayerConfig, name: str, module: nn.Module, spec: FloatSpec) -> FloatSpec:
    """A block-scaled weight's blocks run along its input channels: dimension 1 (0 for ConvTranspose), the
    reduction dimension, which is a Linear weight's last."""
    shape = tuple(module.weight.shape)
    if len(shape) < 2:
        raise ValueError(
            f"config_list[{config.entry_index}]: key 'quant_dtype' has value {spec.quant_dtype!r} with blocks of "
            f"{spec.granularity.block_size} for 'weight', but module {name!r} ({config.op_type}) has a weight of "
            f"shape {shape}, without input channels to run the blocks along; allowed: block scales (MX, NVFP4, FP8 "
            "blocks) on weights of 2 or more dimensions (Linear, Conv*, Embedding), FP8 per tensor or per channel on "
            "the others"
        )
    dim = 0 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 1
    if shape[dim] % spec.granularity.block_size != 0:
        raise ValueError(
            f"config_list[{config.entry_index}]: {_block_size_text(spec, 'weight')}, but module {name!r} "
            f"({config.op_type}) has {shape[dim]} input channels (weight shape {shape}), not a multiple of it; "
            "allowed: a block_size that divides the input channels of every module the entry selects (the blocks "
            "run along them)"
        )
    return dataclasses.replace(spec, granularity=PerBlock(spec.granularity.block_size, dim))


def check_activation_blocks(config: LayerConfig, name: str, quant_type: str, x: torch.Tensor) -> None:
    """Raises the config_list error for an input or output whose last dimension the entry's block size does not
    divide (known only when the module runs)."""
    granularity = config.specs[quant_type].granularity
    if not isinstance(granularity, PerBlock) or (x.dim() > 0 and x.size(-1) % granularity.block_size == 0):
        return
    raise ValueError(
        f"config_list[{config.entry_index}]: {_block_size_text(config.specs[quant_type], quant_type)}, but module "
        f"{name!r} ({config.op_type}) has an {quant_type} of shape {tuple(x.shape)}, whose last dimension is not a "
        f"multiple of it; allowed: a block_size that divides the last dimension of the {quant_type}s of every module "
        "the entry selects (the blocks run along it)"
    )


def _matches(entry: dict, name: str, module: nn.Module) -> bool:
    if entry["op_types"] is not None and type(module).__name__ not in entry["op_types"]:
        return False
    return entry["op_names"] is None or name in entry["op_names"]


def resolve_config_list(model: nn.Module, config_list: object, rules: AlgorithmRules) -> dict[str, LayerConfig]:
    """Validates ``config_list`` against ``model`` and returns the configuration of every selected module.

    Args:
        model: the model to quantize.
        config_list: a list of NNI config dicts.
        rules: what the quantizer accepts.

    Returns:
        ``{qualified_name: LayerConfig}`` in the model's module order.

    Raises:
        ValueError: a bad entry, naming the entry index, key, value and what is allowed; or a module that
            cannot take what it was given (a 'weight' quant type on a module without a weight parameter).

    Example:
        >>> from fakequant.quantizers.qat import QAT_Quantizer
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU6())
        >>> configs = resolve_config_list(model, [{'quant_types': ['weight'], 'op_types': ['Linear']}],
        ...                               QAT_Quantizer.rules)
        >>> list(configs), configs['0'].bits('weight')
        (['0'], 8)
    """
    if not isinstance(config_list, Sequence) or isinstance(config_list, (str, bytes)):
        raise ValueError(f"config_list must be a list of dicts, got {type(config_list).__name__} {config_list!r}")
    modules = dict(model.named_modules())
    known_types = _known_op_types(model)
    entries = [_validate_entry(i, e, rules, known_types, modules) for i, e in enumerate(config_list)]

    resolved: dict[str, LayerConfig] = {}
    matched_any = [False] * len(entries)
    for name, module in modules.items():
        chosen = None
        for entry in entries:
            if _matches(entry, name, module):
                chosen = entry
                matched_any[entry["index"]] = True
        if chosen is None or chosen["exclude"]:
            continue
        config = LayerConfig(
            name=name,
            op_type=type(module).__name__,
            entry_index=chosen["index"],
            quant_types=tuple(chosen["quant_types"]),
            specs=dict(chosen["specs"]),
            quant_start_step=chosen["quant_start_step"],
        )
        if "weight" in config.quant_types:
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter) or not torch.is_floating_point(weight):
                raise ValueError(
                    f"config_list[{config.entry_index}]: quant type 'weight' selected module {name!r} "
                    f"({config.op_type}), which has no floating-point 'weight' parameter; allowed: modules "
                    "with a weight (Conv*, Linear, ...) or only 'input'/'output' for this module"
                )
            spec = config.specs["weight"]
            if isinstance(spec.granularity, PerBlock):
                spec = config.specs["weight"] = _resolve_weight_blocks(config, name, module, spec)
            granularity = spec.granularity
            if granularity.group_size is not None:
                _check_group_layout(config, name, module, granularity.group_size)
            if granularity.axis is not None:
                # ConvTranspose weights hold output channels on axis 1.
                axis = 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0
                granularity = dataclasses.replace(granularity, axis=axis)
                config.specs["weight"] = dataclasses.replace(spec, granularity=granularity)
        resolved[name] = config
    for index, matched in enumerate(matched_any):
        if not matched:
            # op types are checked against torch.nn and the model; one absent from this model is legal (a
            # shared config_list), but probably not what was meant
            warnings.warn(f"config_list[{index}] matches no module of the model (op_types "
                          f"{sorted(entries[index]['op_types'] or [])})", UserWarning, stacklevel=3)
    return resolved
