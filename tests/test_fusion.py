"""AdapterFusion (fxadapt.fusion, the Fuse block) against AdapterHub 1.3.0's own outputs and fusion attentions
(tests/fixtures/adapterhub/<model>/fusion_*/, made by make_fusion_fixtures.py from adapters and fusion layers with
randomised weights, loaded here from AdapterHub's files), AdapterHub's files written back, gradients under
train_adapter_fusion, one compiled graph, and refused setups as typed errors that change nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import fxadapt
from conftest import HUB, HUB_RTOL as RTOL, hub_base, hub_io
from fxadapt.composition import Block, Fuse, Stack
from fxadapt.errors import AdapterError, CheckpointError, ConfigError
from fxadapt.fusion import DynamicAdapterFusionConfig, StaticAdapterFusionConfig
from fxadapt.testing import assert_unchanged, relative_error, snapshot

FIXTURES = sorted(f"{d.parent.name}/{d.name}" for d in HUB.glob("*/fusion_*") if d.is_dir())


def run(gm, inputs, **kwargs):
    with torch.no_grad():
        return gm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs)


def load(gm, fixture: str, fusion: bool = True) -> dict:
    """The fixture's adapters (and fusion layer) from AdapterHub's files; its meta."""
    meta = json.loads((HUB / fixture / "meta.json").read_text())
    for name in meta["adapters"]:
        gm.load_adapter(str(HUB / fixture / name), name)
    if fusion:
        assert gm.load_adapter_fusion(str(HUB / fixture / "fusion")) == meta["fusion"]
    return meta


@pytest.mark.parametrize("fixture", FIXTURES)
def test_matches_adapterhub(fixture, hub_clean):
    gm = hub_base(fixture.split("/")[0])
    meta = load(gm, fixture)
    setup = Block.from_dict(meta["composition"])
    gm.set_active_adapters(setup)
    assert gm.active_adapters == setup and setup.to_dict() == meta["composition"]
    expected = hub_io(fixture)
    out = run(gm, expected, output_adapter_fusion_attentions=True)
    error = relative_error(out.last_hidden_state, expected["last_hidden_state"])
    assert error < RTOL, f"{fixture}: {error:.2e}"
    attentions = out.adapter_fusion_attentions[meta["fusion"]]
    keys = {k for k in expected if k.startswith("attn.")}
    assert {f"attn.{layer}.{loc}" for layer, by in attentions.items() for loc in by} == keys
    for key in keys:
        _, layer, location = key.split(".")
        got = torch.from_numpy(attentions[int(layer)][location])
        assert relative_error(got, expected[key]) < RTOL, key
    plain = run(gm, expected)  # attentions not asked for: none returned, the same output
    assert plain.get("adapter_fusion_attentions") is None
    temperature = isinstance(meta["fusion_config"], dict) and meta["fusion_config"]["temperature"]  # T fell: another output
    assert torch.equal(plain.last_hidden_state, out.last_hidden_state) != temperature
    # The fusion's weights matter: the same setup with a fusion layer as added (dynamic: V = I) is another function.
    fuse = setup if isinstance(setup, Fuse) else setup.children[-1]
    gm.add_adapter_fusion(fuse, meta["fusion_config"], name="fresh")
    fresh = Fuse(*fuse.children, name="fresh")
    gm.set_active_adapters(fresh if isinstance(setup, Fuse) else Stack(*setup.children[:-1], fresh))
    assert relative_error(run(gm, expected).last_hidden_state, expected["last_hidden_state"]) > 1e3 * RTOL


def test_fixtures_cover_the_configs():
    assert {"roberta/fusion_dynamic_pfeiffer3", "roberta/fusion_static_pfeiffer2", "roberta/fusion_custom_pfeiffer2",
            "roberta/fusion_dynamic_houlsby2", "roberta/fusion_stack_fuse", "roberta/fusion_dynamic_parallel2", "llama/fusion_dynamic_pfeiffer3",
            "llama/fusion_static_pfeiffer2"} <= set(FIXTURES)
    custom = json.loads((HUB / "roberta/fusion_custom_pfeiffer2/fusion/adapter_fusion_config.json").read_text())["config"]
    assert custom["residual_before"] and custom["temperature"] and custom["query_before_ln"] and not custom["value_before_softmax"]
    assert DynamicAdapterFusionConfig().to_dict() == {**StaticAdapterFusionConfig().to_dict(), "value": True, "regularization": True,
                                                      "value_initialized": True}


@pytest.mark.parametrize("fixture", ["roberta/fusion_dynamic_houlsby2", "llama/fusion_static_pfeiffer2"])
@pytest.mark.parametrize("use_safetensors", [False, True])
def test_saves_what_adapterhub_saved(fixture, use_safetensors, hub_clean, tmp_path):
    gm = hub_base(fixture.split("/")[0])
    meta = load(gm, fixture)
    gm.save_adapter_fusion(tmp_path, meta["fusion"], use_safetensors=use_safetensors)
    theirs = torch.load(HUB / fixture / "fusion" / "pytorch_model_adapter_fusion.bin", weights_only=True)
    ours = load_file(tmp_path / "model_adapter_fusion.safetensors") if use_safetensors else \
        torch.load(tmp_path / "pytorch_model_adapter_fusion.bin", weights_only=True)
    assert ours.keys() == theirs.keys()  # AdapterHub's module paths, so AdapterHub loads the file
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    ours_config = json.loads((tmp_path / "adapter_fusion_config.json").read_text())
    theirs_config = json.loads((HUB / fixture / "fusion" / "adapter_fusion_config.json").read_text())
    for field in ("config", "name", "adapter_names", "hidden_size"):
        assert ours_config[field] == theirs_config[field], field
    # and back, under another name: the same function
    gm.set_active_adapters(Fuse(*meta["adapters"]))
    expected = run(gm, hub_io(fixture)).last_hidden_state
    assert gm.load_adapter_fusion(tmp_path, load_as="again", set_active=True) == "again"
    assert gm.active_adapters == Fuse(*meta["adapters"], name="again")
    assert torch.equal(run(gm, hub_io(fixture)).last_hidden_state, expected)


def test_train_adapter_fusion_trains_only_the_fusion(hub_clean):
    fixture = "roberta/fusion_dynamic_pfeiffer3"
    gm = hub_base("roberta")
    meta = load(gm, fixture)
    gm.add_adapter("other", "pfeiffer")
    fuse = Fuse("a", "b", "c")
    gm.train_adapter_fusion(fuse)
    assert gm.training and gm.active_adapters == fuse
    fusion_params = {n for n, _ in gm.named_parameters() if f".adapter_fusion_layer.{meta['fusion']}." in n}
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == fusion_params and len(fusion_params) == 2 * 5
    gm.eval()  # no dropout
    inputs = hub_io(fixture)
    out = gm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    out.square().sum().backward()
    for n, p in gm.named_parameters():
        moved = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert moved == (n in fusion_params), n
    reg = gm.get_fusion_regularization_loss()  # AdapterHub's: 0.01 ||I - V||^2 over the trainable value matrices
    values = [p for n, p in gm.named_parameters() if n in fusion_params and n.endswith("value.weight")]
    assert len(values) == 2 and torch.allclose(reg, sum(0.01 * (torch.eye(128) - v).pow(2).sum() for v in values))
    gm.zero_grad(set_to_none=True)
    gm.train_adapter_fusion(fuse, unfreeze_adapters=True)
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert fusion_params < trainable and all(any(f".{a}." in n for a in "abc") or n in fusion_params for n in trainable)
    for p in gm.parameters():
        p.requires_grad_(False)


def test_compiles_as_one_graph(hub_clean):
    from torch._dynamo.utils import counters

    fixture = "roberta/fusion_custom_pfeiffer2"  # temperature: T falls in place at each call, inside the graph
    gm = hub_base("roberta")
    load(gm, fixture)
    gm.set_active_adapters(Stack("a", Fuse("a", "b")))
    inputs = hub_io(fixture)
    eager = [run(gm, inputs).last_hidden_state for _ in range(2)]
    assert relative_error(eager[0], eager[1]) > 0  # T moved
    gm.delete_adapter_fusion("a,b")
    gm.load_adapter_fusion(HUB / fixture / "fusion")  # T back at 50
    gm.set_active_adapters(Stack("a", Fuse("a", "b")))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    outs = [run(compiled, inputs).last_hidden_state for _ in range(2)]
    assert sum(counters["graph_break"].values()) == 0
    assert all(relative_error(o, e) < RTOL for o, e in zip(outs, eager))
    torch._dynamo.reset()


@pytest.mark.parametrize("call, match", [
    (lambda gm: gm.add_adapter_fusion(Fuse("a", "nope")), "no adapter 'nope'"),
    (lambda gm: gm.add_adapter_fusion(["a", "lora"]), r"adapter 'lora' \(LoRAConfig\) has lora adapters; AdapterFusion fuses bottleneck"),
    (lambda gm: gm.add_adapter_fusion("a,inv"), "'inv'.*invertible adapter"),
    (lambda gm: gm.add_adapter_fusion(Fuse("a", "mh")), r"adapter 'mh' acts at blocks .*\(0, 'mh', 128\).*one hidden size at the same blocks"),
    (lambda gm: gm.add_adapter_fusion(Fuse("a", "b"), "dynamic"), "already has an AdapterFusion named 'a,b'"),
    (lambda gm: gm.add_adapter_fusion(Fuse("a", Fuse("b"))), "cannot nest Fuse"),
    (lambda gm: gm.set_active_adapters(Fuse("a", "c")), r"no AdapterFusion 'a,c'.*add_adapter_fusion first"),
    (lambda gm: gm.set_active_adapters(Fuse("a", "b", "c", name="a,b")), "fuses Fuse"),
    (lambda gm: gm.set_active_adapters(Stack("a", Fuse("a", "lora", name="a,b"))), "Fuse cannot compose adapter 'lora'"),
    (lambda gm: gm.train_adapter_fusion(Fuse("b", "c")), "no AdapterFusion 'b,c'"),
    (lambda gm: gm.delete_adapter_fusion("b,c"), "no AdapterFusion 'b,c'"),
])
def test_refused_changes_nothing(call, match, hub_clean):
    gm = hub_base("roberta")
    load(gm, "roberta/fusion_dynamic_pfeiffer3", fusion=False)
    gm.add_adapter("lora", fxadapt.LoRAConfig(r=2))
    gm.add_adapter("inv", "pfeiffer+inv")
    gm.add_adapter("mh", fxadapt.SeqBnConfig(mh_adapter=True, output_adapter=False))
    gm.add_adapter_fusion(Fuse("a", "b"), "static", set_active=True)
    before = snapshot(gm)
    with pytest.raises(AdapterError, match=match):
        call(gm)
    assert_unchanged(gm, before)
    assert gm.active_adapters == Fuse("a", "b")


@pytest.mark.parametrize("config, field", [("nope", "config"), ({**StaticAdapterFusionConfig().to_dict(), "key": "yes"}, "key"),
                                           ({"key": True}, "query"), ({**StaticAdapterFusionConfig().to_dict(), "dropout_prob": 2}, "dropout_prob")])
def test_bad_configs(config, field, hub_clean):
    gm = hub_base("roberta")
    load(gm, "roberta/fusion_static_pfeiffer2", fusion=False)
    before = snapshot(gm)
    with pytest.raises(ConfigError) as info:
        gm.add_adapter_fusion(Fuse("a", "b"), config)
    assert info.value.field == field
    assert_unchanged(gm, before)


def test_bad_files_change_nothing(hub_clean, tmp_path):
    fixture = "roberta/fusion_static_pfeiffer2"
    gm = hub_base("roberta")
    load(gm, fixture, fusion=False)
    before = snapshot(gm)
    bad = tmp_path / "bad"
    shutil.copytree(HUB / fixture / "fusion", bad)
    weights = torch.load(bad / "pytorch_model_adapter_fusion.bin", weights_only=True)
    key = next(iter(weights))
    torch.save({**weights, key: weights[key][:3]}, bad / "pytorch_model_adapter_fusion.bin")
    with pytest.raises(CheckpointError, match="has shape"):
        gm.load_adapter_fusion(bad)
    torch.save({k: v for k, v in weights.items() if k != key}, bad / "pytorch_model_adapter_fusion.bin")
    with pytest.raises(CheckpointError, match="no tensor for"):
        gm.load_adapter_fusion(bad)
    torch.save({**weights, key: weights[key] * float("nan")}, bad / "pytorch_model_adapter_fusion.bin")
    with pytest.raises(CheckpointError, match="NaN"):
        gm.load_adapter_fusion(bad)
    config = json.loads((bad / "adapter_fusion_config.json").read_text())
    config["config"]["value"] = "no"
    (bad / "adapter_fusion_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.value"):
        gm.load_adapter_fusion(bad)
    assert_unchanged(gm, before)


def test_deleting_the_fusion_deactivates_it(hub_clean):
    fixture = "roberta/fusion_stack_fuse"
    gm = hub_base("roberta")
    meta = load(gm, fixture)
    gm.set_active_adapters(Block.from_dict(meta["composition"]))
    gm.delete_adapter_fusion(Fuse("b", "c"))
    assert gm.active_adapters == [] and gm.adapter_fusions == {}
    assert not any("adapter_fusion_layer" in n for n, _ in gm.named_parameters())
    summary = {row["name"]: row for row in gm.adapter_summary(as_dict=True)}
    assert set(summary) >= {"a", "b", "c"}
    assert fxadapt.Fuse is Fuse
