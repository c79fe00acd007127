"""AdaptedModule: named adapters, activation, training, merge and reset, and what the user's model sees."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fxadapt
from conftest import build, inputs_for, perturb_, reference
from fxadapt.testing import assert_outputs_close


@pytest.fixture
def bert():
    model = build("bert")
    return model, fxadapt.capture(model)


def test_rewrite_names_the_adapter_after_the_config_id(bert):
    model, _ = bert
    assert fxadapt.rewrite(model, "ia3").active_adapters == ["ia3"]
    assert fxadapt.rewrite(model, fxadapt.LoRAConfig(r=4)).active_adapters == ["lora"]
    assert fxadapt.rewrite(model, "lora", name="mine").active_adapters == ["mine"]


def test_add_adapter_is_inactive_until_activated(bert):
    model, gm = bert
    inputs = inputs_for(model)
    gm.add_adapter("a", fxadapt.LoRAConfig(init_weights="bert"))
    assert gm.active_adapters == [] and list(gm.adapters) == ["a"]
    with torch.no_grad():
        assert torch.equal(gm(**inputs)[0], reference(model, inputs)[0])
        gm.set_active_adapters("a")
        assert not torch.allclose(gm(**inputs)[0], reference(model, inputs)[0])
        gm.set_active_adapters(None)
        assert torch.equal(gm(**inputs)[0], reference(model, inputs)[0])


def test_only_active_adapters_act_and_compose_in_order(bert):
    model, gm = bert
    inputs = inputs_for(model)
    gm.add_adapter("a", "lora")
    gm.add_adapter("b", "ia3")
    perturb_(gm.get_submodule("encoder"), std=0.0)
    for name in ("a", "b"):
        for p in gm.adapter_state_dict(name).values():
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.2)
    with torch.no_grad():
        gm.set_active_adapters(["a"]); only_a = gm(**inputs)[0]
        gm.set_active_adapters(["b"]); only_b = gm(**inputs)[0]
        gm.set_active_adapters(["a", "b"]); both = gm(**inputs)[0]
    assert not torch.allclose(only_a, both) and not torch.allclose(only_b, both)
    # Merging both folds them in the same order: (W + dW) * l.
    gm.merge_adapter(["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs)[0], both, rtol=1e-5, atol=1e-5)


def test_train_adapter_freezes_everything_else(bert):
    model, gm = bert
    gm.add_adapter("a", "lora")
    gm.add_adapter("b", "lora")
    gm.train_adapter("a", also=["pooler"])
    assert gm.training and gm.active_adapters == ["a"]
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in gm.named_parameters() if ".loras.a." in n or n.startswith("pooler.")}
    inputs = inputs_for(model)
    out = gm(**inputs)
    out.last_hidden_state.sum().backward()
    grads = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert grads == {n for n in trainable if ".loras.a." in n}  # pooler is not on the path to last_hidden_state
    assert all(".lora_" in n for n in grads)
    # The base parameters are the model's own: it sees them frozen too (documented, as in PEFT).
    assert not model.embeddings.word_embeddings.weight.requires_grad
    with pytest.raises(fxadapt.AdapterError, match="names no base parameter"):
        gm.train_adapter("a", also=["nothing"])


def test_merge_never_writes_into_the_users_model(bert):
    model, gm = bert
    original = copy.deepcopy(model.state_dict())
    gm.add_adapter("a", "lora", set_active=True)
    gm.add_adapter("b", "ia3", set_active=True)
    perturb_(gm.get_submodule("encoder.layer.0.attention.self.query.loras"))
    perturb_(gm.get_submodule("encoder.layer.0.attention.self.key.loras"))
    weight = gm.get_parameter("encoder.layer.0.attention.self.query.weight")
    assert weight is model.encoder.layer[0].attention.self.query.weight
    gm.merge_adapter(["a", "b"])
    merged = gm.get_parameter("encoder.layer.0.attention.self.query.weight")
    assert merged is not weight and not torch.equal(merged, weight)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    gm.reset_adapter("b")
    assert gm.merged_adapters == ["a"]
    gm.reset_adapter()
    assert gm.get_parameter("encoder.layer.0.attention.self.query.weight") is weight


def test_merged_graph_is_the_base_graph(bert):
    model, gm = bert
    base_targets = [n.target for n in gm.graph.nodes]
    gm.add_adapter("a", fxadapt.LoRAConfig(attn_matrices=["q", "k", "v", "o"], intermediate_lora=True, output_lora=True), set_active=True)
    assert len(gm.graph.nodes) > len(base_targets)
    gm.merge_adapter("a")
    assert [n.target for n in gm.graph.nodes] == base_targets
    assert not any(".loras." in str(n.target) for n in gm.graph.nodes)


def test_delete_adapter_removes_its_weights(bert):
    _, gm = bert
    n_params = len(list(gm.parameters()))
    gm.add_adapter("a", "lora", set_active=True)
    gm.merge_adapter("a")
    gm.delete_adapter("a")
    assert len(list(gm.parameters())) == n_params
    assert gm.adapters == {} and gm.active_adapters == [] and gm.merged_adapters == []
    assert not any("loras" in n for n, _ in gm.named_modules())


def test_state_errors(bert):
    _, gm = bert
    gm.add_adapter("a", "lora")
    with pytest.raises(fxadapt.AdapterError, match="already has an adapter named 'a'"):
        gm.add_adapter("a", "lora")
    with pytest.raises(fxadapt.AdapterError, match="no adapter 'zz'.*adapters: a"):
        gm.set_active_adapters(["zz"])
    with pytest.raises(fxadapt.AdapterError, match="without '.'"):
        gm.add_adapter("a.b", "lora")
    with pytest.raises(fxadapt.AdapterError, match="taken by torch.nn.Module"):
        gm.add_adapter("half", "lora")
    with pytest.raises(fxadapt.ConfigError, match="unknown config id .lorra.; valid ids: .*lora, ia3"):
        gm.add_adapter("x", "lorra")
    gm.merge_adapter("a")
    with pytest.raises(fxadapt.AdapterError, match="merged"):
        gm.set_active_adapters([])
    with pytest.raises(fxadapt.AdapterError, match="merged"):
        gm.train_adapter("a")
    with pytest.raises(fxadapt.AdapterError, match="not merged"):
        gm.add_adapter("b", "lora") or gm.reset_adapter("b")


def test_adapter_state_dict_keys_are_module_paths(bert):
    _, gm = bert
    gm.add_adapter("a", "lora")
    sd = gm.adapter_state_dict("a")
    assert sorted(sd) == sorted(f"encoder.layer.{i}.attention.self.{m}.lora_{ab}" for i in (0, 1) for m in ("query", "value") for ab in "AB")
    assert sd["encoder.layer.0.attention.self.query.lora_A"].shape == (8, 32)
    assert sd["encoder.layer.0.attention.self.query.lora_B"].shape == (32, 8)


def test_train_mode_draws_the_same_dropout_as_the_model(bert):
    # Same dropout ops, in the same order, with the same rates: the same random masks.
    model, gm = bert
    inputs = inputs_for(model, pad=False)
    gm.train()
    model.train()
    try:
        torch.manual_seed(0)
        a = gm(**inputs)[0]
        torch.manual_seed(0)
        b = model(**inputs)[0]
        torch.manual_seed(1)
        c = gm(**inputs)[0]
    finally:
        model.eval()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    gm.eval()
    assert torch.equal(gm(**inputs)[0], gm(**inputs)[0])


def test_attention_dropout_is_mode_aware():
    import transformers as T
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)).eval()
    gm = fxadapt.capture(model)
    inputs = inputs_for(model, pad=False)
    with torch.no_grad():
        gm.train()
        torch.manual_seed(0)
        a = gm(**inputs)[0]
        torch.manual_seed(1)
        b = gm(**inputs)[0]
        gm.eval()
        assert not torch.allclose(a, b)
        assert_outputs_close(gm(**inputs), reference(model, inputs))


def test_deepcopy_keeps_adapters(bert):
    model, gm = bert
    gm.add_adapter("a", fxadapt.LoRAConfig(init_weights="bert"), set_active=True)
    clone = copy.deepcopy(gm)
    inputs = inputs_for(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs)[0], gm(**inputs)[0])
    clone.merge_adapter("a")
    assert gm.merged_adapters == [] and clone.merged_adapters == ["a"]
    assert isinstance(clone, fxadapt.AdaptedModule)


def test_pickling_says_how_to_save_instead(bert, tmp_path):
    _, gm = bert
    with pytest.raises(fxadapt.errors.InputError, match="save_adapter"):
        torch.save(gm, tmp_path / "gm.pt")


@pytest.mark.parametrize("config_id", ["lora", "unipelt", "houlsby+inv"])
@pytest.mark.parametrize("arch", ["bert", "llama", "deberta-v2"])
def test_to_another_device_moves_the_graphs_tensors_and_ops(arch, config_id):
    """.to(device) after the capture: the ops that create tensors (arange, masks, copies) create
    them on the new device, and constants and merged weights' originals move too. The meta device
    stands in for an accelerator here (tests/test_gpu.py does the same on CUDA, with values)."""
    model = build(arch)
    gm = fxadapt.rewrite(model, config_id)
    gm.add_adapter("l", "lora")
    gm.merge_adapter("l")
    inputs = inputs_for(model)
    with torch.no_grad():
        shape = gm(**inputs)[0].shape
    gm.to("meta")
    named = {a for n in gm.graph.nodes for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.device)}
    assert named <= {torch.device("meta")}
    with torch.no_grad():
        out = gm(**{k: v.to("meta") for k, v in inputs.items()})[0]
    assert out.device.type == "meta" and out.shape == shape
    constants = [getattr(gm.get_submodule(n.target.rpartition(".")[0]), n.target.rpartition(".")[2])
                 for n in gm.graph.nodes if n.op == "get_attr"]
    gm.reset_adapter("l")
    tensors = [*gm.parameters(), *gm.buffers(), *constants]
    assert all(t.device.type == "meta" for t in tensors if isinstance(t, torch.Tensor))


def test_casting_after_the_capture_warns_that_the_graphs_dtypes_stay(bert):
    _, gm = bert
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm.to("cpu", torch.float32)  # nothing changes: no warning
    with pytest.warns(UserWarning, match="captured in torch.float32 and its weights are now torch.bfloat16"):
        gm.to(torch.bfloat16)
