"""Checkpoints: native round trips (bit for bit), PEFT 0.21 both ways in the same process, AdapterHub
1.3.0 fixtures, safe loading, failures that leave the model as it was, dtypes, averaging."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import peft
import pytest
import numpy as np
import torch
import transformers as T
from hypothesis import assume, given, strategies as st
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

import fxadapt
from conftest import ARCHS, build, captured, inputs_for, masked
from fxadapt import testing
from fxadapt.errors import AdapterError, CheckpointError, ConfigError
from fxadapt.testing import ia3_configs, lora_configs

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
LAYER_1 = r"(.*\.)?1\..*"  # every module path inside layer 1, on any architecture


@contextlib.contextmanager
def cleanup(gm):
    """Delete the adapters a test adds to a shared capture."""
    before = list(gm.adapters)
    try:
        yield gm
    finally:
        for name in [n for n in gm.adapters if n not in before]:
            gm.delete_adapter(name)
        gm.eval()


def randomize(gm, name: str, seed: int = 0, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gm.adapter_state_dict(name).values():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def run(module, inputs, **extra):
    with torch.no_grad():
        return module(**inputs, **extra)


def snapshot(gm, inputs):
    """Everything a failed load must leave alone (fxadapt.testing.snapshot: parameters bit for bit,
    adapters, code, modes), and the outputs."""
    return testing.snapshot(gm), run(gm, inputs)[0]


def assert_unchanged(gm, inputs, before) -> None:
    state, out = before
    testing.assert_unchanged(gm, state)
    assert torch.equal(run(gm, inputs)[0], out)


def close(actual, expected, rtol: float = 1e-5) -> None:
    """Equal up to rounding: within ``rtol`` of each value plus ``rtol`` of the largest one (values near
    zero are judged on the tensor's scale, on any CPU or BLAS)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.detach().abs().max().item())


# -- native format: bit-identical round trips ------------------------------------------------------


def with_patterns(draw_config):
    """A config, sometimes with per-module rank/alpha (layer 1) or (IA)^3 input scaling (layer 1)."""

    @st.composite
    def build_(draw):
        config = draw(draw_config)
        if config.method == "lora" and draw(st.booleans()):
            config = config.replace(rank_pattern={LAYER_1: draw(st.integers(1, 4))}, alpha_pattern={LAYER_1: draw(st.sampled_from([1, 3.5]))})
        if config.method == "ia3" and draw(st.booleans()):
            config = config.replace(input_scaling_targets=LAYER_1, leave_out=[])
        return config

    return build_()


@given(st.sampled_from(ARCHS), with_patterns(st.one_of(lora_configs(), ia3_configs())), st.integers(0, 2**16))
def test_native_round_trip_is_bit_identical(arch, config, seed):
    model, gm = captured(arch)
    inputs = inputs_for(model)
    with cleanup(gm), tempfile.TemporaryDirectory() as d:
        gm.add_adapter("prop", config, set_active=True)
        randomize(gm, "prop", seed)
        expected = run(gm, inputs).to_tuple()
        weights = {k: v.detach().clone() for k, v in gm.adapter_state_dict("prop").items()}
        gm.save_adapter(d, "prop")
        saved = json.loads(Path(d, "fxadapt_config.json").read_text())
        assert saved["format"] == "fxadapt" and saved["fxadapt_version"] == fxadapt.__version__ and saved["modules"]
        gm.delete_adapter("prop")
        assert gm.load_adapter(d, set_active=True) == "prop"
        assert gm.adapters["prop"] == config
        loaded = gm.adapter_state_dict("prop")
        assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
        for a, b in zip(run(gm, inputs).to_tuple(), expected):
            assert torch.equal(a, b)


def test_load_adapter_under_another_name_and_name_errors(tmp_path):
    model, gm = captured("bert")
    inputs = inputs_for(model)
    with cleanup(gm):
        gm.add_adapter("a", fxadapt.LoRAConfig(r=2), set_active=True)
        gm.save_adapter(tmp_path, "a")
        assert gm.load_adapter(tmp_path, "b") == "b" and gm.active_adapters == ["a"]
        before = snapshot(gm, inputs)
        with pytest.raises(AdapterError, match="already has an adapter named 'b'"):
            gm.load_adapter(tmp_path, "b")
        with pytest.raises(AdapterError, match="adapter name must be"):
            gm.load_adapter(tmp_path, "not.a.name")
        assert_unchanged(gm, inputs, before)
        with pytest.raises(CheckpointError, match="format must be one of"):
            gm.save_adapter(tmp_path / "x", "a", format="onnx")


# -- PEFT 0.21 in the same process -----------------------------------------------------------------

PEFT_TO_FXADAPT = {
    "bert-lora": ("bert", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "pooler.dense"], rank_pattern={"value": 2},
                                          alpha_pattern={r"layer\.1\..*query": 32}, use_rslora=True, lora_dropout=0.1, init_lora_weights=False)),
    "llama-lora": ("llama", peft.LoraConfig(r=4, lora_alpha=16, target_modules=r".*\.(q_proj|v_proj|down_proj)", rank_pattern={"down_proj": 3},
                                            alpha_pattern={"q_proj": 4}, init_lora_weights=False)),
    "gpt2-lora": ("gpt2", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"], init_lora_weights=False)),
    "bert-ia3": ("bert", peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"], init_ia3_weights=False)),
    "llama-ia3": ("llama", peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)),
    "gpt2-ia3": ("gpt2", peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], init_ia3_weights=False)),
}


def _extra(arch: str) -> dict:
    return {"use_cache": False} if arch in ("llama", "gpt2") else {}


@pytest.mark.parametrize("case", list(PEFT_TO_FXADAPT))
def test_peft_checkpoint_loads_with_peft_outputs(case, tmp_path):
    arch, peft_config = PEFT_TO_FXADAPT[case]
    model, gm = captured(arch)
    theirs = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(peft_config)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "ia3_l" in name:  # PEFT's random init is around 0; keep the scales near 1
                p.mul_(0.1).add_(1.0)
    theirs.save_pretrained(tmp_path)
    inputs = inputs_for(model)
    with cleanup(gm):
        name = gm.load_adapter(tmp_path, set_active=True)
        config = gm.adapters[name]
        adapted = [m for m in theirs.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
        assert len({key.rsplit(".", 1)[0] for key in gm.adapter_state_dict(name)}) == len(adapted)
        if isinstance(peft_config, peft.LoraConfig):
            assert (config.dropout, config.use_rslora, dict(config.rank_pattern)) == (peft_config.lora_dropout, peft_config.use_rslora, peft_config.rank_pattern)
        ours = run(gm, inputs)
        ref = run(theirs, inputs, **_extra(arch))
        for key in ref.keys():
            close(masked(ours[key], inputs) if ours[key].ndim == 3 else ours[key], masked(ref[key], inputs) if ref[key].ndim == 3 else ref[key])


def test_peft_whole_c_attn_loads_as_whole_linear(tmp_path):
    """PEFT adapts GPT-2's fused c_attn as one Conv1D (fan_in_fan_out): one whole-linear site, standard A/B shapes."""
    model, gm = captured("gpt2")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    h = model.config.n_embd
    with cleanup(gm):
        name = gm.load_adapter(tmp_path)
        state = gm.adapter_state_dict(name)
        assert sorted(state) == [f"h.{i}.attn.c_attn.{w}" for i in range(2) for w in ("lora_A", "lora_B")]
        assert state["h.0.attn.c_attn.lora_A"].shape == (4, h) and state["h.0.attn.c_attn.lora_B"].shape == (3 * h, 4)
        assert all(p.site.columns is None for p in gm._fx_adapters[name].placements)


def test_peft_checkpoint_of_a_head_model_loads_into_the_base_model(tmp_path):
    """Module paths are matched by suffix: a file from BertForSequenceClassification (bert.encoder...) fits BertModel."""
    torch.manual_seed(0)
    cls = T.BertForSequenceClassification(build("bert").config).eval()
    gm = fxadapt.capture(copy.deepcopy(cls.bert))
    theirs = peft.get_peft_model(cls, peft.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path)
    inputs = inputs_for(cls)
    gm.load_adapter(tmp_path, set_active=True)
    expected = theirs.base_model.model.bert(**inputs).last_hidden_state
    close(masked(run(gm, inputs), inputs), masked(expected.detach(), inputs))


@functools.lru_cache(maxsize=None)
def head_and_base():
    """A BertForSequenceClassification, its capture and the capture of its BertModel (a copy)."""
    torch.manual_seed(0)
    cls = T.BertForSequenceClassification(build("bert").config).eval()
    return cls, fxadapt.capture(cls), fxadapt.capture(copy.deepcopy(cls.bert))


def _paths_config(kind: str, prefix: str):
    """A config naming module paths as the model it is added to has them (``prefix`` "bert." on the head model)."""
    if kind == "lora":  # full paths in targets and in the patterns, as fxadapt's PEFT writer puts them
        query = re.escape(f"{prefix}encoder.layer.1.attention.self.query")
        return fxadapt.LoRAConfig(r=2, alpha=4, targets=[f"{prefix}pooler.dense"], rank_pattern={query: 3}, alpha_pattern={query: 9})
    if kind == "ia3":
        return fxadapt.IA3Config(input_scaling_targets=[f"{prefix}encoder.layer.0.output.dense"])
    return kind


@pytest.mark.parametrize("direction", ["head to base", "base to head"])
@pytest.mark.parametrize("fmt, kind", [("fxadapt", "lora"), ("peft", "lora"), ("fxadapt", "ia3"), ("peft", "ia3"), ("fxadapt", "seq_bn")])
def test_checkpoint_of_a_head_model_fits_its_base_model_and_back(tmp_path, direction, fmt, kind):
    """Module paths match by suffix in every format fxadapt writes: an adapter saved from
    BertForSequenceClassification (bert.encoder...) loads into its BertModel (encoder...) and the other
    way round, with the same weights and so the same function of the shared BertModel part."""
    cls, head, base = head_and_base()
    src, dst, prefix = (head, base, "bert.") if direction == "head to base" else (base, head, "")
    inputs = inputs_for(cls)
    with cleanup(src), cleanup(dst):
        src.add_adapter("a", _paths_config(kind, prefix), set_active=True)
        randomize(src, "a")
        src.save_adapter(tmp_path, "a", format=fmt)
        assert dst.load_adapter(tmp_path, "b", set_active=True) == "b"
        ours, theirs = src.adapter_state_dict("a"), dst.adapter_state_dict("b")
        strip = lambda key: key.removeprefix("bert.")
        assert sorted(map(strip, ours)) == sorted(map(strip, theirs))
        assert all(torch.equal(theirs[k], dict(zip(map(strip, ours), ours.values()))[strip(k)]) for k in theirs)
        # The head's logits are its classifier on the BertModel's pooled output.
        logits, pooled = run(head, inputs).logits, run(base, inputs).pooler_output
        close(logits, cls.classifier(pooled).detach())
        assert not torch.allclose(pooled, run(cls.bert, inputs).pooler_output)  # the adapter acts


@pytest.mark.parametrize("fmt", ["fxadapt", "peft"])
def test_key_mapping_renames_module_paths_in_every_format(tmp_path, fmt):
    """A checkpoint whose module paths were renamed (encoder -> stack) is refused as it is and loads with
    ``key_mapping`` to the same weights and outputs."""
    model, gm = captured("bert")
    inputs = inputs_for(model)
    with cleanup(gm):
        gm.add_adapter("a", fxadapt.LoRAConfig(r=2, targets=["encoder.layer.0.output.dense"]), set_active=True)
        randomize(gm, "a")
        expected, weights = run(gm, inputs)[0], {k: v.detach().clone() for k, v in gm.adapter_state_dict("a").items()}
        gm.save_adapter(tmp_path, "a", format=fmt)
        gm.delete_adapter("a")
        for path in tmp_path.iterdir():
            if path.suffix == ".json":
                path.write_text(path.read_text().replace("encoder.", "stack.").replace(r"encoder\\.", r"stack\\."))
            else:
                save_file({k.replace("encoder.", "stack."): v for k, v in load_file(path).items()}, path)
        before = snapshot(gm, inputs)
        with pytest.raises(CheckpointError, match="stack|missing"):
            gm.load_adapter(tmp_path, "a")
        assert_unchanged(gm, inputs, before)
        gm.load_adapter(tmp_path, "a", set_active=True, key_mapping={r"^stack\.": "encoder."})
        assert all(torch.equal(v, weights[k]) for k, v in gm.adapter_state_dict("a").items()) and weights.keys() == gm.adapter_state_dict("a").keys()
        assert torch.equal(run(gm, inputs)[0], expected)


FXADAPT_TO_PEFT = {
    "bert-lora": ("bert", fxadapt.LoRAConfig(r=4, alpha=8, output_lora=True, targets=["pooler.dense"], rank_pattern={"value": 2},
                                             alpha_pattern={"query": 16}, use_rslora=True, dropout=0.1)),
    "llama-lora": ("llama", fxadapt.LoRAConfig(r=4, attn_matrices=["q", "k", "v", "o"], intermediate_lora=True, rank_pattern={LAYER_1: 2})),
    "gpt2-lora-fused": ("gpt2", fxadapt.LoRAConfig(r=4, alpha=8, output_lora=True)),
    "gpt2-rslora-fused": ("gpt2", fxadapt.LoRAConfig(r=2, alpha=3, use_rslora=True, attn_matrices=["q", "k", "v"])),
    "bert-ia3": ("bert", fxadapt.IA3Config(input_scaling_targets=["output.dense"])),
    "gpt2-ia3-fused": ("gpt2", fxadapt.IA3Config(input_scaling_targets=["mlp.c_proj"])),
    "llama-ia3-alpha": ("llama", fxadapt.IA3Config(alpha=2, output_lora=True)),
}


@pytest.mark.parametrize("case", list(FXADAPT_TO_PEFT))
def test_peft_format_loads_in_peft_with_fxadapt_outputs(case, tmp_path):
    arch, config = FXADAPT_TO_PEFT[case]
    model, gm = captured(arch)
    inputs = inputs_for(model)
    with cleanup(gm):
        gm.add_adapter("a", config, set_active=True)
        randomize(gm, "a")
        ours = run(gm, inputs)
        gm.save_adapter(tmp_path, "a", format="peft")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
        ref = run(theirs, inputs, **_extra(arch))
        for key in ref.keys():
            close(masked(ours[key], inputs) if ours[key].ndim == 3 else ours[key], masked(ref[key], inputs) if ref[key].ndim == 3 else ref[key])
        # ... and back into fxadapt
        name = gm.load_adapter(tmp_path, "back", set_active=True)
        gm.set_active_adapters([name])
        close(masked(run(gm, inputs)[0], inputs), masked(ours[0], inputs))


def test_fused_per_role_lora_is_written_with_block_structure(tmp_path):
    model, gm = captured("gpt2")
    h = model.config.n_embd
    with cleanup(gm):
        gm.add_adapter("a", fxadapt.LoRAConfig(r=4, alpha=8), set_active=True)  # q and v parts of c_attn
        randomize(gm, "a")
        gm.save_adapter(tmp_path, "a", format="peft")
        saved = load_file(tmp_path / "adapter_model.safetensors")
        a, b = saved["base_model.model.h.0.attn.c_attn.lora_A.weight"], saved["base_model.model.h.0.attn.c_attn.lora_B.weight"]
        state = gm.adapter_state_dict("a")
        assert a.shape == (8, h) and b.shape == (3 * h, 8)
        assert torch.equal(a, torch.cat([state["h.0.attn.c_attn.q.lora_A"], state["h.0.attn.c_attn.v.lora_A"]]))
        assert torch.equal(b[:h, :4], state["h.0.attn.c_attn.q.lora_B"]) and torch.equal(b[2 * h:, 4:], state["h.0.attn.c_attn.v.lora_B"])
        assert not b[:h, 4:].any() and not b[h:2 * h].any() and not b[2 * h:, :4].any()
        meta = json.loads((tmp_path / "adapter_config.json").read_text())
        key = re.escape("h.0.attn.c_attn")
        assert meta["rank_pattern"][key] == 8 and meta["alpha_pattern"][key] / 8 == 2.0


# -- (IA)^3 on the input side, rank/alpha patterns -------------------------------------------------


def test_input_scaling_targets_scale_the_input_and_merge_exactly():
    model, gm = captured("bert")
    inputs = inputs_for(model)
    with cleanup(gm):
        gm.add_adapter("a", fxadapt.IA3Config(input_scaling_targets=["output.dense"]), set_active=True)
        randomize(gm, "a")
        placements = {p.site.path: p for p in gm._fx_adapters["a"].placements}
        down = placements["encoder.layer.0.output.dense"]
        assert down.side == "input" and placements["encoder.layer.0.attention.self.key"].side == "output"
        scale = gm.adapter_state_dict("a")["encoder.layer.0.output.dense.scale"]
        weight = gm.get_parameter("encoder.layer.0.output.dense.weight")
        assert scale.shape == (weight.shape[1],)
        unmerged = run(gm, inputs)[0]
        gm.merge_adapter("a")
        assert torch.equal(gm.get_parameter("encoder.layer.0.output.dense.weight"), weight * scale.detach()[None, :])
        close(run(gm, inputs)[0], unmerged)
        gm.reset_adapter()
        assert gm.get_parameter("encoder.layer.0.output.dense.weight") is weight


@pytest.mark.parametrize("keys, path", [
    (["value"], "encoder.layer.0.attention.self.value"),
    (["self.value", "value"], "encoder.layer.0.attention.self.value"),
    (["alue"], "encoder.layer.0.attention.self.value"),
    ([r"layer\.1\..*query"], "encoder.layer.1.attention.self.query"),
    ([r"layer\.1\..*query"], "encoder.layer.0.attention.self.query"),
    ([LAYER_1, "query"], "encoder.layer.1.attention.self.query"),
    (["query", LAYER_1], "encoder.layer.1.attention.self.query"),
])
def test_rank_and_alpha_patterns_match_as_peft(keys, path):
    ranks = {k: i + 2 for i, k in enumerate(keys)}
    config = fxadapt.LoRAConfig(r=8, alpha=16, rank_pattern=ranks, alpha_pattern={k: 10 * v for k, v in ranks.items()})
    want = ranks.get(get_pattern_key(list(ranks), path))  # PEFT's own matching
    assert config.rank_for(path) == (want or 8)
    assert config.alpha_for(path) == (10 * want if want else 16)
    assert config.scaling_for(path) == config.alpha_for(path) / config.rank_for(path)


def test_rank_pattern_sets_the_site_shapes():
    _, gm = captured("bert")
    with cleanup(gm):
        gm.add_adapter("a", fxadapt.LoRAConfig(r=4, alpha=8, rank_pattern={"value": 2}, alpha_pattern={LAYER_1: 1}))
        state = gm.adapter_state_dict("a")
        assert state["encoder.layer.0.attention.self.query.lora_A"].shape[0] == 4
        assert state["encoder.layer.0.attention.self.value.lora_A"].shape[0] == 2
        modules = {p.site.path: gm.get_submodule(p.module) for p in gm._fx_adapters["a"].placements}
        assert modules["encoder.layer.0.attention.self.value"].scaling == 4.0
        assert modules["encoder.layer.1.attention.self.value"].scaling == 0.5


def test_pattern_fields_validate_and_round_trip():
    config = fxadapt.LoRAConfig(rank_pattern={"value": 2, r"layer\.1\..*": 4}, alpha_pattern={"query": 32.0})
    assert config.rank_pattern == (("value", 2), (r"layer\.1\..*", 4))
    hash(config)
    assert fxadapt.AdapterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    ia3 = fxadapt.IA3Config(input_scaling_targets=["output.dense"])
    assert fxadapt.AdapterConfig.from_dict(json.loads(json.dumps(ia3.to_dict()))) == ia3
    for kwargs, field in [({"rank_pattern": {"value": 0}}, "rank_pattern"), ({"rank_pattern": "value"}, "rank_pattern"),
                          ({"alpha_pattern": {"(": 2}}, "alpha_pattern"), ({"alpha_pattern": {"q": -1}}, "alpha_pattern"),
                          ({"input_scaling_targets": ["output.dense"]}, "input_scaling_targets")]:
        with pytest.raises(ConfigError) as e:
            fxadapt.LoRAConfig(**kwargs)
        assert e.value.field == field
    with pytest.raises(ConfigError) as e:
        fxadapt.IA3Config(rank_pattern={"key": 2})
    assert e.value.field == "rank_pattern"


# -- AdapterHub fixtures -----------------------------------------------------------------------------

# Every fixture: each model's bottleneck, Compacter, invertible, prefix, union, LoRA and (IA)^3 adapters.
# Fixtures with a test of their own: AdapterHub's VeRA (full D and B matrices, A and B not saved:
# tests/test_adapterhub_lora_variants.py), DiReFT (AdapterHub saves it as NoReFT: tests/test_reft.py) and
# prompt tuning (the prompt positions in the output: tests/test_prompt_tuning.py).
OWN_TESTS = {"vera", "variant_vera", "direft", "prompt_tuning"}
# Compositions (compose_*) and fusions (fusion_*) hold several adapters: test_composition / test_fusion read them.
ADAPTERHUB_CASES = sorted((d.parent.name, d.name) for d in FIXTURES.glob("*/*")
                          if d.is_dir() and d.name not in {"base", *OWN_TESTS} and not d.name.startswith(("compose_", "fusion_")))


@functools.lru_cache(maxsize=None)
def adapterhub_base(model_dir: str):
    """The transformers 5 model of a fixture's base weights, its capture, and the module renames since
    transformers 4.57 (found by equal weights: ViT's query became q_proj)."""
    base = FIXTURES / model_dir / "base"
    model = T.AutoModel.from_pretrained(base).eval()
    params = dict(model.named_parameters())
    renames = {}
    for key, value in load_file(base / "model.safetensors").items():
        hits = [n for n, p in params.items() if key.endswith(".weight") and p.shape == value.shape and torch.equal(p, value)]
        if len(hits) == 1 and hits[0] != key:
            renames["^" + re.escape(key.removesuffix(".weight")) + "$"] = hits[0].removesuffix(".weight")
    return model, fxadapt.capture(model), renames


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="no AdapterHub fixtures (tests/fixtures/adapterhub)")
@pytest.mark.parametrize("model_dir, config_id", ADAPTERHUB_CASES)
def test_adapterhub_adapter_matches_adapterhub_outputs(model_dir, config_id):
    directory = FIXTURES / model_dir / config_id
    io = load_file(directory / "io.safetensors")
    meta = json.loads((directory / "meta.json").read_text())
    model, gm, renames = adapterhub_base(model_dir)
    inputs = {k: io[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in io}
    missing = directory / "not_saved_by_adapterhub.safetensors"  # Compacter's rule: AdapterHub does not save it
    with cleanup(gm):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            name = gm.load_adapter(directory, set_active=True, key_mapping=renames)
        assert name == meta["adapter_name"]
        assert any("PHM rule" in str(w.message) for w in caught) == missing.exists()
        state = gm.adapter_state_dict(name)
        if missing.exists():
            with torch.no_grad():
                for key, tensor in load_file(missing).items():
                    state[key.replace(f".{name}.", ".")].copy_(tensor)
        assert sum(p.numel() for p in state.values()) == meta["adapter_summary"]["#param"]
        out = run(gm, inputs).last_hidden_state
        mask = inputs.get("attention_mask")
        expected, base = io["last_hidden_state"], io["base_last_hidden_state"]
        if mask is not None:
            out, expected, base = (x * mask[..., None] for x in (out, expected, base))
        assert (expected - base).abs().max() > 1e-3  # the adapter matters
        close(out, expected, rtol=1e-4)  # AdapterHub ran on transformers 4.57, another graph
        scores = directory / "gating_scores.json"
        if scores.exists():  # UniPELT: AdapterHub's gate values, adapter -> layer -> location
            ours = gm(**inputs, output_adapter_gating_scores=True).adapter_gating_scores[name]
            for layer, locations in json.loads(scores.read_text())[name].items():
                for location, value in locations.items():
                    close(torch.as_tensor(np.asarray(ours[int(layer)][location], dtype=np.float64)), torch.tensor(value, dtype=torch.float64))


def write_adapterhub_lora(directory: Path, tensors: dict, *, hidden: int = 32, name: str = "lora") -> None:
    """A small AdapterHub LoRA checkpoint as AdapterHub writes it (config + torch pickle)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architecture": "lora", "selfattn_lora": True, "intermediate_lora": False, "output_lora": False, "leave_out": [], "r": 2,
              "alpha": 2, "dropout": 0.0, "attn_matrices": ["q", "v"], "composition_mode": "add", "init_weights": "lora",
              "init_weights_seed": None, "use_gating": False, "use_dora": False, "vera_b": None, "vera_d": None, "dtype": None}
    (directory / "adapter_config.json").write_text(json.dumps({"config": config, "hidden_size": hidden, "model_class": "BertModel",
                                                                "name": name, "version": "adapters.1.3.0"}))
    torch.save(tensors, directory / "pytorch_adapter.bin")


def adapterhub_lora_tensors(hidden: int = 32, layers: int = 2, r: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"encoder.layer.{i}.attention.self.{m}.loras.lora.{w}": torch.randn(shape, generator=g)
            for i in range(layers) for m in ("query", "value") for w, shape in (("lora_A", (r, hidden)), ("lora_B", (hidden, r)))}


def test_adapterhub_pickle_with_tensors_only_loads(tmp_path):
    model, gm = captured("bert")
    write_adapterhub_lora(tmp_path, adapterhub_lora_tensors())
    with cleanup(gm):
        assert gm.load_adapter(tmp_path) == "lora"
        assert gm.adapters["lora"] == fxadapt.LoRAConfig(r=2, alpha=2)


def test_adapterhub_registry_names_unknown_architectures(tmp_path):
    _, gm = captured("bert")
    write_adapterhub_lora(tmp_path, adapterhub_lora_tensors())
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["config"]["architecture"] = "mtl_lora"
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no converter for AdapterHub architecture 'mtl_lora'") as e:
        gm.load_adapter(tmp_path)
    assert e.value.path.endswith("adapter_config.json")
    assert "lora" in fxadapt.checkpoint.ADAPTERHUB_CONVERTERS


# -- safe loading and failures that change nothing ----------------------------------------------------


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("fmt", ["adapterhub", "peft"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, writer, fmt):
    model, gm = captured("bert")
    inputs = inputs_for(model)
    marker = tmp_path / "pwned"
    payload = {"encoder.layer.0.attention.self.query.loras.lora.lora_A": Exploit(marker)}
    directory = tmp_path / "ckpt"
    if fmt == "adapterhub":
        write_adapterhub_lora(directory, {})
        weights = directory / "pytorch_adapter.bin"
    else:
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["query"]}))
        weights = directory / "adapter_model.bin"
    if writer == "torch.save":
        torch.save(payload, weights)
    else:
        weights.write_bytes(pickle.dumps(payload))
    before = snapshot(gm, inputs)
    with pytest.raises(CheckpointError, match="never unpickles code") as e:
        gm.load_adapter(directory)
    assert e.value.path == str(weights)
    assert not marker.exists()
    assert_unchanged(gm, inputs, before)


def test_truncated_or_foreign_pickle_is_refused(tmp_path):
    model, gm = captured("bert")
    inputs = inputs_for(model)
    write_adapterhub_lora(tmp_path, adapterhub_lora_tensors())
    weights = tmp_path / "pytorch_adapter.bin"
    before = snapshot(gm, inputs)
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot be read") as e:
        gm.load_adapter(tmp_path)
    assert e.value.path == str(weights)
    torch.save([torch.zeros(2)], weights)  # tensors, but not by name
    with pytest.raises(CheckpointError, match="not a mapping of names to tensors"):
        gm.load_adapter(tmp_path)
    assert_unchanged(gm, inputs, before)


def _native(tmp_path: Path, model=None) -> Path:
    """A native checkpoint of a randomized LoRA adapter (r=2), of the shared BERT capture or of ``model``."""
    gm = fxadapt.capture(model) if model is not None else captured("bert")[1]
    directory = tmp_path / "native"
    with cleanup(gm):
        gm.add_adapter("lora", fxadapt.LoRAConfig(r=2))
        randomize(gm, "lora")
        gm.save_adapter(directory, "lora")
    return directory


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


Q0 = "encoder.layer.0.attention.self.query.lora_A"
V1 = "encoder.layer.1.attention.self.value.lora_B"

CORRUPTIONS = {
    # name: (edit(directory), error message part, names a tensor)
    "truncated weights": (lambda d: (d / "fxadapt_model.safetensors").write_bytes((d / "fxadapt_model.safetensors").read_bytes()[:-40]),
                          "not a readable safetensors file", None),
    "garbage weights": (lambda d: (d / "fxadapt_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" * 3),
                        "not a readable safetensors file", None),
    "missing weights": (lambda d: (d / "fxadapt_model.safetensors").unlink(), "does not exist", None),
    "broken config": (lambda d: (d / "fxadapt_config.json").write_text('{"format": "fxadapt", "config": {'), "not valid JSON", None),
    "unknown config field": (lambda d: (d / "fxadapt_config.json").write_text(json.dumps(
        {"format": "fxadapt", "config": {"config_class": "LoRAConfig", "rank": 2}})), "invalid config", None),
    "missing tensor": (lambda d: _edit_tensors(d / "fxadapt_model.safetensors", lambda t: t.pop(V1)), "is missing", V1),
    "unexpected tensor": (lambda d: _edit_tensors(d / "fxadapt_model.safetensors", lambda t: t.update({"pooler.dense.lora_A": torch.zeros(2, 32)})),
                          "unexpected tensor", "pooler.dense.lora_A"),
    "wrong shape": (lambda d: _edit_tensors(d / "fxadapt_model.safetensors", lambda t: t.update({Q0: torch.zeros(3, 32)})), "has shape", Q0),
    "integer tensor": (lambda d: _edit_tensors(d / "fxadapt_model.safetensors", lambda t: t.update({Q0: torch.zeros(2, 32, dtype=torch.int32)})),
                       "has dtype torch.int32", Q0),
    "mixed dtypes": (lambda d: _edit_tensors(d / "fxadapt_model.safetensors", lambda t: t.update({V1: t[V1].half()})), "has dtype torch.float16", V1),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_native_checkpoints_raise_and_change_nothing(tmp_path, case):
    edit, message, tensor = CORRUPTIONS[case]
    directory = _native(tmp_path)
    edit(directory)
    model, gm = captured("bert")
    inputs = inputs_for(model)
    before = snapshot(gm, inputs)
    with pytest.raises(CheckpointError, match=message) as e:
        gm.load_adapter(directory)
    assert e.value.path and e.value.path.startswith(str(directory))
    assert e.value.tensor == tensor
    if tensor:
        assert tensor in str(e.value) and e.value.path in str(e.value)
    assert_unchanged(gm, inputs, before)


@pytest.mark.parametrize("other, tensor", [
    (dict(hidden_size=48, num_attention_heads=4), Q0),                # another hidden size: shapes differ
    (dict(num_hidden_layers=3), "encoder.layer.2.attention.self.query.lora_A"),  # a deeper model: a tensor too many
    (dict(num_hidden_layers=1), "encoder.layer.1.attention.self.query.lora_A"),  # a shallower model: tensors missing
])
@pytest.mark.parametrize("fmt", ["fxadapt", "peft", "adapterhub"])
def test_adapter_of_another_base_model_is_refused(tmp_path, other, tensor, fmt):
    config = T.BertConfig(**{**build("bert").config.to_dict(), **other})
    torch.manual_seed(0)
    if fmt == "adapterhub":
        directory = tmp_path / "ah"
        write_adapterhub_lora(directory, adapterhub_lora_tensors(config.hidden_size, config.num_hidden_layers))
    elif fmt == "peft":
        directory = tmp_path / "peft"
        theirs = peft.get_peft_model(T.BertModel(config), peft.LoraConfig(r=2, target_modules=["query", "value"]))
        theirs.save_pretrained(directory)
    else:
        directory = _native(tmp_path, model=T.BertModel(config).eval())
    model, gm = captured("bert")
    inputs = inputs_for(model)
    before = snapshot(gm, inputs)
    with pytest.raises(CheckpointError) as e:
        gm.load_adapter(directory)
    if other.get("num_hidden_layers") != 1:  # a tensor of the file is named as the file names it (a missing one as fxadapt does)
        tensor = {"fxadapt": tensor, "peft": "base_model.model." + tensor.replace("lora_A", "lora_A.weight"),
                  "adapterhub": tensor.replace("lora_A", "loras.lora.lora_A")}[fmt]
    assert e.value.tensor == tensor, str(e.value)
    assert tensor in str(e.value) and os.path.basename(e.value.path) in str(e.value)
    assert_unchanged(gm, inputs, before)


def test_failure_while_adding_removes_the_partial_adapter(tmp_path, monkeypatch):
    directory = _native(tmp_path)
    model, gm = captured("bert")
    inputs = inputs_for(model)
    before = snapshot(gm, inputs)
    real = type(gm).adapter_state_dict

    def broken(self, name):
        state = real(self, name)
        state[Q0] = torch.zeros(1, 32).expand(2, 32)  # the right shape, but copy_ into it fails
        return state

    monkeypatch.setattr(type(gm), "adapter_state_dict", broken)
    with pytest.raises(RuntimeError):
        gm.load_adapter(directory)
    monkeypatch.undo()
    assert_unchanged(gm, inputs, before)


def test_directory_without_an_adapter_is_refused(tmp_path):
    _, gm = captured("bert")
    with pytest.raises(CheckpointError, match="holds no adapter"):
        gm.load_adapter(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        gm.load_adapter(tmp_path / "nowhere")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(CheckpointError, match="PREFIX_TUNING"):
        gm.load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_bias": True, "target_modules": ["query"]}))
    with pytest.raises(CheckpointError, match="lora_bias"):
        gm.load_adapter(tmp_path)


# -- dtypes --------------------------------------------------------------------------------------------


def test_fp32_adapter_on_a_bf16_model_is_kept_in_fp32_as_peft_does(tmp_path):
    model = build("bert")
    peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)).save_pretrained(tmp_path)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    gm = fxadapt.capture(bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what add_adapter builds on a bf16 model: nothing to warn of
        name = gm.load_adapter(tmp_path, set_active=True)
    assert gm.adapters[name].dtype == "float32"
    assert all(p.dtype == torch.float32 for p in gm.adapter_state_dict(name).values())
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model).to(torch.bfloat16), tmp_path).eval()
    assert all(p.dtype == torch.float32 for n, p in theirs.named_parameters() if "lora_" in n)
    inputs = inputs_for(model)
    ours, ref = run(gm, inputs)[0], run(theirs, inputs)[0]
    assert ours.dtype == ref.dtype == torch.bfloat16
    close(masked(ours, inputs).float(), masked(ref, inputs).float(), rtol=2 * torch.finfo(torch.bfloat16).eps)  # one bf16 rounding apart


def test_a_bf16_adapter_on_an_fp32_model_is_kept_in_bf16_with_a_warning(tmp_path):
    model = build("bert")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    peft.get_peft_model(bf16, peft.LoraConfig(r=4, target_modules=["query"]), autocast_adapter_dtype=False).save_pretrained(tmp_path)
    gm = fxadapt.capture(model)
    with pytest.warns(UserWarning, match=r"weights are torch\.bfloat16, the model's torch\.float32: kept in torch\.bfloat16"):
        name = gm.load_adapter(tmp_path)
    assert gm.adapters[name].dtype == "bfloat16"


# -- averaging -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [fxadapt.LoRAConfig(r=2, output_lora=True), fxadapt.IA3Config()])
def test_average_adapter_is_the_weighted_sum_of_tensors(config):
    model, gm = captured("bert")
    inputs = inputs_for(model)
    with cleanup(gm):
        gm.add_adapter("a", config)
        gm.add_adapter("b", config.replace(dropout=0.0 if config.method == "ia3" else 0.1, init_weights="bert"))
        randomize(gm, "a", seed=1)
        randomize(gm, "b", seed=2)
        a = {k: v.detach().clone() for k, v in gm.adapter_state_dict("a").items()}
        b = {k: v.detach().clone() for k, v in gm.adapter_state_dict("b").items()}
        gm.average_adapter("avg", ["a", "b"], [1.0, 3.0])  # normalized: 0.25, 0.75
        gm.average_adapter("equal", ["a", "b"])  # equal weights
        gm.average_adapter("diff", ["a", "b"], [1.0, -1.0], normalize_weights=False, set_active=True)  # tensor by tensor
        assert gm.adapters["avg"] == config and gm.active_adapters == ["diff"]
        for key in a:
            eps = torch.finfo(torch.float32).eps  # one rounding of a two-term sum
            close(gm.adapter_state_dict("avg")[key], 0.25 * a[key] + 0.75 * b[key], rtol=2 * eps)
            close(gm.adapter_state_dict("equal")[key], 0.5 * a[key] + 0.5 * b[key], rtol=2 * eps)
            close(gm.adapter_state_dict("diff")[key], a[key] - b[key], rtol=2 * eps)
            assert torch.equal(gm.adapter_state_dict("a")[key], a[key])
        before = snapshot(gm, inputs)
        with pytest.raises(AdapterError, match="sum to 0"):
            gm.average_adapter("x", ["a", "b"], [1.0, -1.0])
        gm.add_adapter("c", config.replace(alpha=4))
        with pytest.raises(AdapterError, match=r"differ in \['alpha'\]"):
            gm.average_adapter("x", ["a", "c"])
        gm.delete_adapter("c")
        with pytest.raises(AdapterError, match="no adapter 'zzz'"):
            gm.average_adapter("x", ["a", "zzz"])
        assert_unchanged(gm, inputs, before)


@given(st.sampled_from(ARCHS), st.sampled_from(sorted(fxadapt.CONFIGS)), st.integers(0, 2**16))
def test_native_round_trip_of_every_config_id(arch, config_id, seed):
    """Every method fxadapt has (every id of CONFIGS) round-trips bit for bit where the model takes it."""
    model, gm = captured(arch)
    inputs = inputs_for(model)
    with cleanup(gm), tempfile.TemporaryDirectory() as d:
        try:
            gm.add_adapter("prop", config_id, set_active=True)
        except (fxadapt.SiteError, ConfigError):
            assume(False)  # a method this architecture has no place for
        randomize(gm, "prop", seed)
        expected = run(gm, inputs).to_tuple()
        gm.save_adapter(d, "prop")
        gm.delete_adapter("prop")
        assert gm.load_adapter(d, set_active=True) == "prop"
        assert gm.adapters["prop"] == fxadapt.CONFIGS[config_id]
        for a, b in zip(run(gm, inputs).to_tuple(), expected):
            assert torch.equal(a, b)
