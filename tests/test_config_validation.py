"""Config validation: every field of every config class against a plain reference of what the field
accepts (a table of values and a hypothesis fuzz), AdapterHub's defaults accepted, unions that put
two adapters at one place refused, and the layers a config names checked against the model."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxadapt
from conftest import captured, inputs_for, perturb_, restored
from fxadapt.config import (CONFIGS, AdapterConfig, BnConfig, CompacterConfig, CompacterPlusPlusConfig, ConfigUnion, DoRAConfig, DoubleSeqBnConfig,
                            DoubleSeqBnInvConfig, IA3Config, LoRAConfig, MAMConfig, ParBnConfig, PrefixTuningConfig, PromptTuningConfig, SeqBnConfig,
                            SeqBnInvConfig, UniPELTConfig, VeraConfig)
from fxadapt.config import DiReftConfig, LoReftConfig, NoReftConfig
from fxadapt.testing import assert_outputs_close, assert_unchanged, rounding_tolerance, snapshot

# -- the reference: what each field accepts, written plainly -------------------------------------


def _finite(v) -> bool:
    if type(v) not in (int, float):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _regex(v) -> bool:
    try:
        re.compile(v)
        return True
    except re.error:
        return False


def _is_list(v) -> bool:
    return type(v) in (list, tuple)


def boolean(v): return type(v) is bool
def size(v): return type(v) is int and 1 <= v <= 2**31
def positive(v): return _finite(v) and v > 0
def non_negative(v): return _finite(v) and v >= 0
def probability(v): return _finite(v) and 0 <= v < 1
def seed(v): return v is None or type(v) is int and -2**63 <= v < 2**64
def layers(v): return _is_list(v) and all(type(i) is int and 0 <= i < 2**31 for i in v)
def one_of(*options): return lambda v: type(v) is str and v in options
def optional(check): return lambda v: v is None or check(v)
def activation(v): return type(v) is str and v.lower() in ("relu", "swish", "silu", "gelu", "gelu_new", "tanh", "sigmoid", "leakyrelu", "linear")
def names(v): return v is None or type(v) is str and _regex(v) or _is_list(v) and len(v) > 0 and all(type(t) is str and t for t in v)
def matrices(v): return _is_list(v) and all(type(m) is str and m in "qkvo" and len(m) == 1 for m in v) and len(set(v)) == len(v)


def pattern(valid):
    # PEFT's rank_pattern / alpha_pattern: a key is a regex matched as (.*\.)?(key)$ on module paths.
    def check(v):
        pairs = list(v.items()) if type(v) is dict else v
        if not _is_list(pairs) or not all(_is_list(p) and len(p) == 2 for p in pairs):
            return False
        keys = [k for k, _ in pairs]
        return all(type(k) is str and k and _regex(rf"(.*\.)?({k})$") for k in keys) and len(set(keys)) == len(keys) and all(valid(x) for _, x in pairs)
    return check


def reduction_factor(v):
    if type(v) is not dict:
        return positive(v)
    layer_keys = all(k == "default" or type(k) is str and re.fullmatch(r"0|[1-9][0-9]{0,9}", k) and int(k) < 2**31 for k in v)
    return "default" in v and layer_keys and all(positive(x) for x in v.values())


LORA_FIELDS = {
    "selfattn_lora": boolean, "intermediate_lora": boolean, "output_lora": boolean, "leave_out": layers, "r": size,
    "alpha": positive, "dropout": probability, "attn_matrices": matrices, "composition_mode": one_of("add", "scale"),
    "init_weights": one_of("lora", "bert", "ia3", "vera"), "init_weights_seed": seed, "use_gating": boolean, "use_rslora": boolean,
    "targets": names, "dtype": optional(one_of("float32", "float16", "bfloat16", "float64")), "rank_pattern": pattern(size),
    "alpha_pattern": pattern(positive), "input_scaling_targets": names, "use_dora": boolean, "vera_d": optional(_finite),
    "vera_b": optional(_finite),
    "modules_to_save": lambda v: v is None or isinstance(v, (list, tuple)) and bool(v) and all(isinstance(t, str) and t and not t.startswith(".") for t in v),
}
BN_FIELDS = {
    "mh_adapter": boolean, "output_adapter": boolean, "reduction_factor": reduction_factor, "non_linearity": activation,
    "original_ln_before": boolean, "original_ln_after": boolean, "ln_before": boolean, "ln_after": boolean,
    "init_weights": one_of("bert", "mam_adapter", "houlsby"), "init_weights_seed": seed, "is_parallel": boolean,
    "scaling": lambda v: _finite(v) or v in ("learned", "channel") and type(v) is str, "use_gating": boolean,
    "residual_before_ln": lambda v: type(v) is bool or v == "post_add" and type(v) is str, "adapter_residual_before_ln": boolean,
    "inv_adapter": optional(one_of("nice")), "inv_adapter_reduction_factor": optional(positive), "cross_adapter": lambda v: v is False,
    "leave_out": layers, "dropout": probability, "phm_layer": boolean, "phm_dim": size, "factorized_phm_W": boolean,
    "shared_W_phm": boolean, "shared_phm_rule": boolean, "factorized_phm_rule": boolean, "phm_c_init": one_of("normal", "uniform"),
    "phm_init_range": non_negative, "learn_phm": boolean, "hypercomplex_nonlinearity": one_of("glorot-normal", "glorot-uniform", "normal"),
    "phm_rank": size, "phm_bias": boolean, "stochastic_depth": lambda v: _finite(v) and v == 0,
}
PREFIX_FIELDS = {
    "encoder_prefix": boolean, "cross_prefix": boolean, "leave_out": layers, "flat": boolean, "prefix_length": size,
    "bottleneck_size": size, "non_linearity": activation, "dropout": probability, "use_gating": boolean, "shared_gating": boolean,
    "init_weights_seed": seed,
}
PROMPT_FIELDS = {
    "prompt_length": size, "prompt_init": one_of("random_uniform", "from_string"), "prompt_init_text": optional(lambda v: type(v) is str and v != ""),
    "random_uniform_scale": non_negative, "combine": one_of("prefix", "prefix_after_bos"), "init_weights_seed": seed,
    "prompt_init_ids": optional(lambda v: _is_list(v) and len(v) > 0 and all(type(i) is int and 0 <= i < 2**31 for i in v)),
}
REFT_FIELDS = {
    "layers": lambda v: v == "all" and type(v) is str or layers(v), "prefix_positions": lambda v: type(v) is int and 0 <= v <= 2**31,
    "suffix_positions": lambda v: type(v) is int and 0 <= v <= 2**31, "r": size, "orthogonality": boolean, "tied_weights": boolean,
    "subtract_projection": boolean, "dropout": probability, "non_linearity": optional(activation),
    "dtype": optional(one_of("float32", "float16", "bfloat16", "float64")), "output_reft": lambda v: v is True, "init_weights_seed": seed,
}
# Per class: the reference of each field, and the fields whose rules join several fields (checked
# after every field is valid on its own: (IA)^3 needs r=1 and no dropout, a config must select a place...).
CLASSES = {
    LoRAConfig: (LORA_FIELDS, {"r", "dropout", "rank_pattern", "input_scaling_targets", "selfattn_lora", "use_dora", "composition_mode"}),
    IA3Config: (LORA_FIELDS, {"r", "dropout", "rank_pattern", "input_scaling_targets", "selfattn_lora", "use_dora", "composition_mode"}),
    DoRAConfig: (LORA_FIELDS, {"r", "dropout", "rank_pattern", "input_scaling_targets", "selfattn_lora", "use_dora", "composition_mode"}),
    VeraConfig: (LORA_FIELDS, {"r", "dropout", "rank_pattern", "input_scaling_targets", "selfattn_lora", "use_dora", "composition_mode"}),
    **{c: (BN_FIELDS, {"inv_adapter_reduction_factor", "reduction_factor", "output_adapter"}) for c in (
        BnConfig, SeqBnConfig, SeqBnInvConfig, DoubleSeqBnConfig, DoubleSeqBnInvConfig, ParBnConfig, CompacterConfig, CompacterPlusPlusConfig)},
    PrefixTuningConfig: (PREFIX_FIELDS, set()),
    PromptTuningConfig: (PROMPT_FIELDS, {"prompt_init_ids"}),
    **{c: (REFT_FIELDS, {"prefix_positions", "suffix_positions"}) for c in (LoReftConfig, NoReftConfig, DiReftConfig)},
}


def test_the_reference_covers_every_field():
    for cls, (fields, _) in CLASSES.items():
        assert set(fields) == {f.name for f in dataclasses.fields(cls)}, cls.__name__
        defaults = cls()
        assert all(fields[f](getattr(defaults, f)) for f in fields), cls.__name__


def _json_round_trip(config: AdapterConfig) -> None:
    text = json.dumps(config.to_dict(), allow_nan=False)
    assert AdapterConfig.from_dict(json.loads(text)) == config


def _expect(cls, changes: dict) -> str:
    """Construct ``cls(**changes)`` and check the outcome against the reference: the first invalid field
    (in field order) is the one named; with every field valid, it succeeds (a JSON round trip gives it
    back) or a rule joining fields names one of its fields. Returns the outcome."""
    fields, joined = CLASSES[cls]
    bad = [f.name for f in dataclasses.fields(cls) if f.name in changes and not fields[f.name](changes[f.name])]
    try:
        config = cls(**changes)
    except fxadapt.ConfigError as e:
        assert e.field is not None and f"{cls.__name__}.{e.field} " in str(e), str(e)
        if bad:
            assert e.field == bad[0], (changes, str(e))
        else:
            assert e.field in joined, (changes, str(e))
        return "refused"
    assert not bad, f"{cls.__name__} accepted {bad[0]}={changes[bad[0]]!r}"
    _json_round_trip(config)
    return "accepted"


# Values from the issue and around each kind's edges; every one is tried on every field of every class.
VALUES = [None, True, False, 0, 1, 2, -1, 0.5, 1.0, 2.5, 1e-300, 5e-324, float("inf"), float("-inf"), float("nan"), 2**31, 2**31 + 1,
          10**12, 10**400, -(2**64), "", "abc", "false", "true", "bogus", "(", ".*query", "q", "k", "nice", "post_add", "learned",
          "relu", "RELU", "scale", "lora", "bert", "float16", "normal", [], [0], [1, 0], [-1], [2**31], [0.0], ["q", "v"], ["q", "q"],
          ["x"], ["query"], [""], [1.5, 2], ["a", 1], [["a", 1]], [["a", 1], ["a", 2]], {}, {"default": 4}, {"0": 2},
          {"default": 4, "1": 2}, {"default": 4, "01": 2}, {"default": 4, 1: 2}, {"default": float("inf")}, {"query": 4},
          {"query": 0}, {"query": float("nan")}, {"query": float("inf")}, {"(": 1}, {"(?i)q": 2}, {1: 2}, ("q",), b"q", object()]


@pytest.mark.parametrize("cls", list(CLASSES), ids=lambda c: c.__name__)
def test_every_field_against_the_reference(cls):
    outcomes = collections.Counter(_expect(cls, {f.name: v}) for f in dataclasses.fields(cls) for v in VALUES)
    assert outcomes["refused"] > outcomes["accepted"] > 0


@pytest.mark.parametrize("cls, field, value", [
    (LoRAConfig, "alpha", float("inf")), (LoRAConfig, "alpha_pattern", {"query": float("inf")}),
    (LoRAConfig, "alpha_pattern", {"query": float("nan")}), (LoRAConfig, "init_weights_seed", "bogus"), (LoRAConfig, "r", 10**12),
    (LoRAConfig, "rank_pattern", {"query": 10**9 * 10**3}), (LoRAConfig, "dropout", "abc"), (LoRAConfig, "use_rslora", "false"),
    (LoRAConfig, "selfattn_lora", 1), (LoRAConfig, "leave_out", [0.0]), (LoRAConfig, "attn_matrices", "qv"),
    (IA3Config, "alpha", float("nan")), (SeqBnConfig, "scaling", float("nan")), (ParBnConfig, "scaling", float("-inf")),
    (CompacterConfig, "phm_init_range", None), (SeqBnConfig, "init_weights_seed", "bogus"), (SeqBnConfig, "reduction_factor", float("inf")),
    (SeqBnConfig, "reduction_factor", {"default": 16, "layer0": 2}), (SeqBnConfig, "reduction_factor", {"default": 16, 0: 2}),
    (SeqBnConfig, "stochastic_depth", []), (SeqBnConfig, "residual_before_ln", 1), (SeqBnConfig, "non_linearity", ["relu"]),
    (SeqBnInvConfig, "inv_adapter_reduction_factor", float("nan")), (CompacterConfig, "phm_dim", 10**12),
    (PrefixTuningConfig, "prefix_length", 10**12), (PrefixTuningConfig, "bottleneck_size", 0), (PrefixTuningConfig, "flat", "false"),
])
def test_issue_values_raise_config_error_naming_the_field(cls, field, value):
    with pytest.raises(fxadapt.ConfigError, match=rf"^{cls.__name__}\.{field} (.* )?must be .*, got ") as info:
        cls(**{field: value})
    assert info.value.field == field


def test_sizes_are_capped_at_two_to_the_31():
    assert LoRAConfig(r=2**31).r == 2**31 and PrefixTuningConfig(prefix_length=2**31).prefix_length == 2**31
    for make in (lambda: LoRAConfig(r=2**31 + 1), lambda: PrefixTuningConfig(prefix_length=2**31 + 1)):
        with pytest.raises(fxadapt.ConfigError, match=r"2\*\*31"):
            make()


# AdapterHub 1.3.0's defaults, as its configs' to_dict() writes them (copied from
# ../shared/reference/adapterhub-1.3.0-config-defaults.txt, which a fresh clone does not have).
BN = {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu", "original_ln_before": True,
      "original_ln_after": True, "ln_before": False, "ln_after": False, "init_weights": "bert", "init_weights_seed": None,
      "is_parallel": False, "scaling": 1.0, "use_gating": False, "residual_before_ln": True, "adapter_residual_before_ln": False,
      "inv_adapter": None, "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
      "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
      "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
      "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0}
LORA = {"architecture": "lora", "selfattn_lora": True, "intermediate_lora": False, "output_lora": False, "leave_out": [], "r": 8,
        "alpha": 8, "dropout": 0.0, "attn_matrices": ["q", "v"], "composition_mode": "add", "init_weights": "lora",
        "init_weights_seed": None, "use_gating": False, "use_dora": False, "vera_d": None, "vera_b": None, "dtype": None}
PREFIX = {"architecture": "prefix_tuning", "encoder_prefix": True, "cross_prefix": True, "leave_out": [], "flat": False,
          "prefix_length": 30, "bottleneck_size": 512, "non_linearity": "tanh", "dropout": 0.0, "use_gating": False,
          "shared_gating": True, "init_weights_seed": None}
HOULSBY = {"mh_adapter": True, "non_linearity": "swish", "original_ln_before": False}
PAR = {"reduction_factor": 2, "original_ln_before": False, "init_weights": "mam_adapter", "is_parallel": True, "scaling": 4.0}
INV = {"inv_adapter": "nice", "inv_adapter_reduction_factor": 2}
PHM = {"reduction_factor": 32, "non_linearity": "gelu", "phm_layer": True}
ADAPTERHUB_DEFAULTS = {
    "pfeiffer": (SeqBnConfig, BN), "houlsby": (DoubleSeqBnConfig, {**BN, **HOULSBY}), "parallel": (ParBnConfig, {**BN, **PAR}),
    "scaled_parallel": (ParBnConfig, {**BN, **PAR, "scaling": "learned"}), "pfeiffer+inv": (SeqBnInvConfig, {**BN, **INV}),
    "houlsby+inv": (DoubleSeqBnInvConfig, {**BN, **HOULSBY, **INV}), "seq_bn": (SeqBnConfig, BN),
    "double_seq_bn": (DoubleSeqBnConfig, {**BN, **HOULSBY}), "par_bn": (ParBnConfig, {**BN, **PAR}),
    "scaled_par_bn": (ParBnConfig, {**BN, **PAR, "scaling": "learned"}), "seq_bn_inv": (SeqBnInvConfig, {**BN, **INV}),
    "double_seq_bn_inv": (DoubleSeqBnInvConfig, {**BN, **HOULSBY, **INV}), "compacter++": (CompacterPlusPlusConfig, {**BN, **PHM}),
    "compacter": (CompacterConfig, {**BN, **HOULSBY, **PHM}), "prefix_tuning": (PrefixTuningConfig, PREFIX),
    "prefix_tuning_flat": (PrefixTuningConfig, {**PREFIX, "flat": True}), "lora": (LoRAConfig, LORA),
    "ia3": (IA3Config, {**LORA, "intermediate_lora": True, "r": 1, "alpha": 1, "attn_matrices": ["k", "v"], "composition_mode": "scale",
                        "init_weights": "ia3"}),
    "dora": (DoRAConfig, {**LORA, "use_dora": True}),
    "vera": (VeraConfig, {**LORA, "vera_d": 0.1, "vera_b": 0.0, "init_weights": "vera"}),
    # AdapterHub's random_uniform_scale is a class attribute, not a field: its JSON leaves it out.
    "prompt_tuning": (PromptTuningConfig, {"architecture": "prompt_tuning", "prompt_length": 10, "prompt_init": "random_uniform",
                                           "prompt_init_text": None, "combine": "prefix", "init_weights_seed": None}),
    # AdapterHub's subtract_projection is a class attribute, not a field: its JSON leaves it out.
    **{cid: (cls, {"architecture": "reft", "layers": "all", "prefix_positions": 3, "suffix_positions": 0, "r": 1, "orthogonality": ortho,
                   "tied_weights": False, "dropout": 0.05, "non_linearity": None, "dtype": None, "output_reft": True,
                   "init_weights_seed": None})
       for cid, cls, ortho in (("loreft", LoReftConfig, True), ("noreft", NoReftConfig, False), ("direft", DiReftConfig, False))},
    "mam": (MAMConfig, [(PrefixTuningConfig, {**PREFIX, "bottleneck_size": 800}), (ParBnConfig, {**BN, **PAR})]),
    "unipelt": (UniPELTConfig, [(PrefixTuningConfig, {**PREFIX, "prefix_length": 10, "use_gating": True}),
                                (SeqBnConfig, {**BN, "use_gating": True}), (LoRAConfig, {**LORA, "alpha": 2, "use_gating": True})]),
}
def _fxadapt_fields(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if k != "architecture"}


# Methods only PEFT has: their defaults are PEFT's (checked against PEFT's own configs below).
PEFT_ONLY = {"loha": "LoHaConfig", "lokr": "LoKrConfig"}


def test_adapterhub_defaults_are_accepted():
    assert set(ADAPTERHUB_DEFAULTS) | set(PEFT_ONLY) == set(CONFIGS) and not set(ADAPTERHUB_DEFAULTS) & set(PEFT_ONLY)
    for config_id, (cls, fields) in ADAPTERHUB_DEFAULTS.items():
        if isinstance(fields, list):
            config = cls(*[part(**_fxadapt_fields(f)) for part, f in fields])
        else:
            config = cls(**_fxadapt_fields(fields))
            as_dict = {"config_class": cls.__name__, "architecture": fields.get("architecture"), **_fxadapt_fields(fields)}
            assert AdapterConfig.from_dict(as_dict) == config, config_id
        assert config == CONFIGS[config_id], config_id


def test_peft_only_defaults_are_peft_defaults():
    import peft

    names = ("r", "alpha", "rank_dropout", "module_dropout", "init_weights", "decompose_both", "decompose_factor", "rank_dropout_scale")
    for config_id, cls in PEFT_ONLY.items():
        ours, theirs = CONFIGS[config_id], getattr(peft, cls)()
        shared = [f for f in names if hasattr(ours, f) and hasattr(theirs, f)]
        assert {"r", "alpha", "init_weights"} <= set(shared), config_id
        assert {f: getattr(ours, f) for f in shared} == {f: getattr(theirs, f) for f in shared}, config_id


def test_every_config_id_round_trips_through_json():
    for config in CONFIGS.values():
        _json_round_trip(config)


# -- from_dict ----------------------------------------------------------------------------------


@pytest.mark.parametrize("data, field", [
    ({"config_class": "LoRAConfig", "rank": 3}, "rank"), ({"config_class": "LoRAConfig", "r": "8"}, "r"),
    ({"config_class": "LoRAConfig", "use_rslora": "false"}, "use_rslora"), ({"config_class": "LoRAConfig", "dropout": "abc"}, "dropout"),
    ({"config_class": ["LoRAConfig"]}, "config_class"), ({"config_class": "LoraConfig"}, "config_class"),
    ({"config_class": "SeqBnConfig", "architecture": "lora"}, "architecture"), ([("r", 8)], "config"), ("lora", "config"),
    ({"config_class": "ConfigUnion", "configs": "lora"}, "configs"), ({"config_class": "ConfigUnion", "configs": [["r", 8]]}, "configs"),
    ({"config_class": "ConfigUnion", "configs": []}, "configs"), ({"config_class": "MAMConfig", "configs": [], "x": 1}, "x"),
    ({"config_class": "SeqBnConfig", "phm_init_range": None}, "phm_init_range"),
])
def test_from_dict_names_the_field(data, field):
    with pytest.raises(fxadapt.ConfigError) as info:
        AdapterConfig.from_dict(data)
    assert info.value.field == field


def test_deeply_nested_union_is_a_config_error_not_recursion():
    data = {"config_class": "LoRAConfig"}
    for _ in range(100_000):
        data = {"config_class": "ConfigUnion", "configs": [data]}
    with pytest.raises(fxadapt.ConfigError, match="not unions") as info:
        AdapterConfig.from_dict(data)
    assert info.value.field == "configs"


def test_configs_do_not_alias_callers_containers():
    factors = {"default": 16, "1": 8}
    config = SeqBnConfig(reduction_factor=factors)
    factors["1"] = float("nan")
    assert config.reduction_factor == {"default": 16, "1": 8}


# -- unions ---------------------------------------------------------------------------------------


def test_two_parts_at_one_projection_are_refused_at_construction():
    with pytest.raises(fxadapt.ConfigError) as info:
        ConfigUnion(LoRAConfig(attn_matrices=["k"]), IA3Config())
    assert info.value.field == "configs"
    assert str(info.value).startswith("ConfigUnion: LoRAConfig and IA3Config both put a LoRA/(IA)^3 adapter on the key projection (k) "
                                      "in the same union (parts 0 and 1)")
    for parts in ([LoRAConfig(selfattn_lora=False, intermediate_lora=True), IA3Config(attn_matrices=["q"])],
                  [LoRAConfig(output_lora=True), SeqBnConfig(), LoRAConfig(selfattn_lora=False, output_lora=True)],
                  [SeqBnInvConfig(), DoubleSeqBnInvConfig(output_adapter=False)], [DoubleSeqBnConfig(), ParBnConfig(output_adapter=False, mh_adapter=True)]):
        with pytest.raises(fxadapt.ConfigError, match="both put") as info:
            ConfigUnion(*parts)
        assert info.value.field == "configs"


@pytest.mark.parametrize("union", [
    MAMConfig(), UniPELTConfig(), ConfigUnion(PrefixTuningConfig(), ParBnConfig()), ConfigUnion(LoRAConfig(attn_matrices=["q"]), LoRAConfig(attn_matrices=["v"])),
    ConfigUnion(LoRAConfig(), IA3Config(attn_matrices=["k"])), ConfigUnion(LoRAConfig(output_lora=True), SeqBnConfig()),
    ConfigUnion(DoubleSeqBnConfig(mh_adapter=True, output_adapter=False), ParBnConfig()), ConfigUnion(SeqBnInvConfig(), LoRAConfig(), PrefixTuningConfig(flat=True)),
    ConfigUnion(LoRAConfig(attn_matrices=["k"], leave_out=[1]), IA3Config(leave_out=[0])),
], ids=lambda u: "+".join(type(c).__name__ for c in u.configs))
def test_unions_at_different_places_stay_valid(union):
    assert ConfigUnion(*union.configs) == ConfigUnion(configs=list(union.configs))
    _json_round_trip(union)


def test_union_arguments_are_checked():
    for make, field in ((lambda: MAMConfig(prefix_tuning=LoRAConfig()), "prefix_tuning"), (lambda: UniPELTConfig(lora="lora"), "lora"),
                        (lambda: ConfigUnion(configs=5), "configs"), (lambda: ConfigUnion(LoRAConfig(), configs=[SeqBnConfig()]), "configs"),
                        (lambda: MAMConfig(scaling=2), "scaling"), (lambda: ConfigUnion(MAMConfig()), "configs"), (lambda: ConfigUnion(), "configs")):
        with pytest.raises(fxadapt.ConfigError) as info:
            make()
        assert info.value.field == field


# Parts the union fuzz draws from (a dict is read with from_dict); where each puts adapters, written plainly.
PARTS = [(LoRAConfig(attn_matrices=["q"]), {"q"}), (LoRAConfig(attn_matrices=["k"]), {"k"}), (LoRAConfig(), {"q", "v"}),
         ({"config_class": "LoRAConfig", "r": 4}, {"q", "v"}), (LoRAConfig(selfattn_lora=False, output_lora=True), {"ffn_out"}),
         (IA3Config(), {"k", "v", "ffn_in"}), (IA3Config(attn_matrices=["o"], intermediate_lora=False), {"o"}),
         (LoRAConfig(targets=["query"], selfattn_lora=False), set()), (SeqBnConfig(), {"bn output"}),
         (DoubleSeqBnConfig(), {"bn mh", "bn output"}), (ParBnConfig(), {"bn output"}), (DoubleSeqBnConfig(output_adapter=False), {"bn mh"}),
         (SeqBnInvConfig(), {"bn output", "embedding"}), (BnConfig(output_adapter=False, inv_adapter="nice", inv_adapter_reduction_factor=2), {"embedding"}),
         (PrefixTuningConfig(), {"prefix"}), (PrefixTuningConfig(flat=True, use_gating=True), {"prefix"}),
         (LoRAConfig(attn_matrices=["q"], leave_out=[0]), set())]
# What a union must refuse as a part, and the field it names.
GARBAGE = [(None, "configs"), (1, "configs"), ("lora", "configs"), ({"config_class": "LoRAConfig", "r": -1}, "r"), (MAMConfig(), "configs"),
           ([], "configs"), ({"config_class": "MAMConfig"}, "configs"), (IA3Config(use_gating=True, attn_matrices=["o"]), "use_gating")]
ATTACKS: collections.Counter = collections.Counter()


@given(st.lists(st.one_of(st.sampled_from(PARTS), st.sampled_from(GARBAGE)), max_size=4), st.booleans())
def test_union_fuzz_against_the_reference(parts, as_keyword):
    configs = [config for config, _ in parts]
    places = [where for _, where in parts if isinstance(where, set)]
    refused = [field for _, field in parts if isinstance(field, str)]
    overlap = any(a & b for i, a in enumerate(places) for b in places[:i])
    try:
        union = ConfigUnion(configs=configs) if as_keyword else ConfigUnion(*configs)
    except fxadapt.ConfigError as e:
        assert refused or overlap or not parts, str(e)
        assert e.field in refused or e.field == "configs", str(e)
        ATTACKS["ConfigUnion", "refused"] += 1
        return
    assert parts and not refused and not overlap, union
    _json_round_trip(union)
    ATTACKS["ConfigUnion", "accepted"] += 1


# -- fuzz over every field of every class ------------------------------------------------------

# With denormals flushed to zero (FXADAPT_FLUSH_DENORMAL=1), hypothesis cannot draw subnormal floats.
FLUSHED = sys.float_info.min / 2 == 0.0

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 8, 2**31, 2**31 + 1, 10**12, -1]),
                     st.floats(allow_subnormal=not FLUSHED), st.text(max_size=6), st.sampled_from(
                         ["false", "q", "k", "v", "o", "add", "scale", "lora", "bert", "ia3", "relu", "GELU", "nice", "post_add", "learned",
                          "channel", "default", "normal", "uniform", "glorot-normal", "float16", "(", ".*", "0", "1", "01", "mam_adapter"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner),
    st.dictionaries(st.one_of(st.sampled_from(["default", "0", "1", "query", "01"]), st.text(max_size=3), st.integers(0, 3)), inner, max_size=3)),
    max_leaves=6)


@pytest.mark.parametrize("cls", list(CLASSES), ids=lambda c: c.__name__)
@given(data=st.data())
def test_field_fuzz_against_the_reference(cls, data):
    # A few fields of one class at once, each a random value of any type; the reference decides.
    names = [f.name for f in dataclasses.fields(cls)]
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    changes = {name: data.draw(_values, label=name) for name in chosen}
    ATTACKS[cls.__name__, _expect(cls, changes)] += 1


# -- at add_adapter: layers the config names, and places only the model shows -------------------


@pytest.mark.parametrize("config, field, bad", [
    (LoRAConfig(leave_out=[1, 2, 9]), "leave_out", [2, 9]), (SeqBnConfig(leave_out=[5]), "leave_out", [5]),
    (PrefixTuningConfig(prefix_length=2, bottleneck_size=8, leave_out=[0, 2]), "leave_out", [2]),
    (SeqBnConfig(reduction_factor={"default": 16, "1": 8, "7": 4}), "reduction_factor", [7]),
    (ConfigUnion(IA3Config(leave_out=[3]), SeqBnConfig()), "leave_out", [3]),
])
def test_layers_beyond_the_model_name_the_field_and_the_count(config, field, bad):
    _, gm = captured("bert")  # 2 layers
    before = snapshot(gm)
    with pytest.raises(fxadapt.ConfigError, match=re.escape(f"names layer(s) {bad} that BertModel does not have: it has 2 layers (0..1)")) as info:
        gm.add_adapter("x", config)
    assert info.value.field == field and info.value.value == bad
    assert_unchanged(gm, before)


# The smallest normal float, not a denormal: with denormals flushed (FXADAPT_FLUSH_DENORMAL=1) that would read as 0.
@pytest.mark.parametrize("config, field", [
    (SeqBnConfig(reduction_factor=1e-300), "reduction_factor"), (SeqBnConfig(reduction_factor=sys.float_info.min), "reduction_factor"),
    (SeqBnInvConfig(inv_adapter_reduction_factor=100), "inv_adapter_reduction_factor"),
    (SeqBnInvConfig(inv_adapter_reduction_factor=sys.float_info.min), "inv_adapter_reduction_factor"),
])
def test_sizes_that_the_model_makes_impossible(config, field):
    _, gm = captured("bert")
    before = snapshot(gm)
    with pytest.raises(fxadapt.ConfigError) as info:
        gm.add_adapter("x", config)
    assert info.value.field == field and f"{field}=" in str(info.value)
    assert_unchanged(gm, before)


@pytest.mark.parametrize("arch, union, where", [
    ("bert", ConfigUnion(LoRAConfig(attn_matrices=["k"], leave_out=[1]), IA3Config()), "encoder.layer.0.attention.self.key (k)"),
    ("bert", ConfigUnion(LoRAConfig(selfattn_lora=False, targets=["key"]), IA3Config(attn_matrices=["k"], intermediate_lora=False)),
     "encoder.layer.0.attention.self.key"),
    ("gpt2", ConfigUnion(LoRAConfig(attn_matrices=["q"]), LoRAConfig(selfattn_lora=False, targets=["c_attn"])), "h.0.attn.c_attn"),
    ("bert", ConfigUnion(PrefixTuningConfig(leave_out=[0]), PrefixTuningConfig(flat=True)), "the attention of layer 1"),
    ("bert", ConfigUnion(SeqBnConfig(leave_out=[1]), ParBnConfig()), "the output block of layer 0"),
])
def test_parts_at_one_place_that_only_the_model_shows_are_refused_at_add(arch, union, where):
    _, gm = captured(arch)
    before = snapshot(gm)
    with pytest.raises(fxadapt.ConfigError, match=r"ConfigUnion: parts 0 \(\w+\) and 1 \(\w+\) both put an adapter at ") as info:
        gm.add_adapter("u", union)
    assert info.value.field == "configs" and info.value.value.startswith(where), str(info.value)
    assert_unchanged(gm, before)
    assert "u" not in gm.adapters


def test_parts_at_disjoint_layers_act_as_the_separate_adapters():
    # Oracle: a union whose parts sit at different layers computes what its parts do as two adapters.
    model, gm = captured("bert")
    lora, ia3 = LoRAConfig(attn_matrices=["k"], leave_out=[1], init_weights="bert"), IA3Config(leave_out=[0])
    gm.add_adapter("a", lora)
    gm.add_adapter("b", ia3)
    gm.add_adapter("u", ConfigUnion(lora, ia3))
    with restored(gm, "a", "b", "u"):
        separate = {**gm.adapter_state_dict("a"), **gm.adapter_state_dict("b")}
        perturb_(separate.values())
        union = gm.adapter_state_dict("u")
        assert sorted(union) == sorted(separate) and len(separate) == len(gm.adapter_state_dict("a")) + len(gm.adapter_state_dict("b"))
        with torch.no_grad():
            for key, value in union.items():
                value.copy_(separate[key])
            inputs = inputs_for(model)
            gm.set_active_adapters(["a", "b"])
            expected = gm(**inputs)
            gm.set_active_adapters(["u"])
            # The same operations in another order at most: float32 rounding over the hidden size, two layers.
            assert_outputs_close(gm(**inputs), expected, rtol=rounding_tolerance(torch.float32, 32, depth=2), mask=inputs["attention_mask"])
        gm.delete_adapter("u")
