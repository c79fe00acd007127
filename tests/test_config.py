"""Configs: AdapterHub's fields and defaults, validation that names the field."""

from __future__ import annotations

import dataclasses

import pytest

import fxadapt
from fxadapt.config import AdapterConfig, ConfigUnion, LoRAConfig, MAMConfig, resolve_config
from fxadapt.errors import ConfigError


def test_defaults_are_adapterhubs():
    # ../shared/reference/adapterhub-1.3.0-config-defaults.txt
    lora = fxadapt.LoRAConfig()
    assert (lora.selfattn_lora, lora.intermediate_lora, lora.output_lora, lora.r, lora.alpha, lora.dropout) == (True, False, False, 8, 8, 0.0)
    assert (lora.attn_matrices, lora.composition_mode, lora.init_weights, lora.leave_out, lora.use_gating) == (("q", "v"), "add", "lora", (), False)
    ia3 = fxadapt.IA3Config()
    assert (ia3.selfattn_lora, ia3.intermediate_lora, ia3.output_lora, ia3.r, ia3.alpha) == (True, True, False, 1, 1)
    assert (ia3.attn_matrices, ia3.composition_mode, ia3.init_weights) == (("k", "v"), "scale", "ia3")
    assert fxadapt.CONFIGS["lora"] == lora and fxadapt.CONFIGS["ia3"] == ia3
    assert lora.architecture == ia3.architecture == "lora"


def test_configs_are_frozen_and_hashable():
    cfg = fxadapt.LoRAConfig(attn_matrices=["q", "k"], leave_out=[1])
    assert cfg.attn_matrices == ("q", "k") and cfg.leave_out == (1,)
    hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4
    assert cfg.replace(r=4).r == 4


@pytest.mark.parametrize("kwargs, field", [
    ({"r": 0}, "r"), ({"r": 2.5}, "r"), ({"alpha": -1}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"attn_matrices": ["x"]}, "attn_matrices"), ({"composition_mode": "mul"}, "composition_mode"),
    ({"init_weights": "zeros"}, "init_weights"), ({"leave_out": [-1]}, "leave_out"), ({"targets": "("}, "targets"),
    ({"targets": []}, "targets"), ({"selfattn_lora": "yes"}, "selfattn_lora"), ({"dtype": "int8"}, "dtype"),
    ({"composition_mode": "scale", "r": 2}, "r"), ({"selfattn_lora": False}, "selfattn_lora"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(fxadapt.ConfigError, match=f"LoRAConfig.{field} ") as info:
        fxadapt.LoRAConfig(**kwargs)
    assert info.value.field == field


def test_ia3_rejects_dropout():
    with pytest.raises(fxadapt.ConfigError, match="IA3Config.dropout"):
        fxadapt.IA3Config(dropout=0.1)


def test_round_trip_through_dict():
    for cfg in (fxadapt.LoRAConfig(r=4, targets=["query"], leave_out=[0]), fxadapt.IA3Config(), fxadapt.LoRAConfig(targets=r"a\.b")):
        assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(fxadapt.ConfigError, match="has no field"):
        AdapterConfig.from_dict({"config_class": "LoRAConfig", "rank": 3})


def test_unknown_id_lists_valid_ids():
    with pytest.raises(fxadapt.ConfigError, match="valid ids: pfeiffer, .*, lora, ia3, mam, unipelt"):
        fxadapt.resolve_config("lorra")


def test_target_matching():
    regex = fxadapt.LoRAConfig(targets=r".*\.(query|value)")
    assert regex.matches_target("encoder.layer.0.attention.self.query")
    assert not regex.matches_target("encoder.layer.0.attention.self.key")
    names = fxadapt.LoRAConfig(targets=["dense"])
    assert names.matches_target("pooler.dense") and not names.matches_target("pooler.dense2")


def test_ia3_cannot_gate():
    import torch
    gm = fxadapt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    with pytest.raises(fxadapt.ConfigError, match="use_gating"):
        gm.add_adapter("g", fxadapt.IA3Config(targets=["0"], use_gating=True))


def test_adapterhub_config_strings():
    """AdapterHub's parse_adapter_config_string: ids with fields changed, "|" for a union."""
    mam = resolve_config("prefix_tuning[bottleneck_size=800]|parallel")
    assert isinstance(mam, ConfigUnion) and mam.configs == MAMConfig().configs
    assert resolve_config("lora[r=4, alpha=16, attn_matrices=['q', 'k']]") == LoRAConfig(r=4, alpha=16, attn_matrices=["q", "k"])
    assert resolve_config("pfeiffer[reduction_factor={'default': 16, '0': 8}]").factor(0) == 8
    for text, field in [("lora[r=0]", "r"), ("lora[rank=4]", "rank"), ("lorra[r=4]", "config"), ("lora[r=__import__('os')]", "config"),
                        ("lora|", "config"), ("lora[r=4]x", "config"), ("mam|lora", "configs"), ("lora[r=4]|ia3", "configs")]:
        with pytest.raises(ConfigError) as info:
            resolve_config(text)
        assert info.value.field == field, text
