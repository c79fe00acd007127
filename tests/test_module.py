"""AdaptedModule: named adapters, activation, training, merge and reset, and what the user's model sees."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fxadapt
from conftest import build, inputs_for, perturb_, reference
from fxadapt.testing import assert_outputs_close, rounding_tolerance

# Two float32 computations of a 2-layer hidden-32 model that round differently (merged weights,
# another order of sums): the bound follows from float32's epsilon and the reduction length.
RTOL = rounding_tolerance(torch.float32, 64, depth=2)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Equal up to rounding, relative to the magnitude of the expected values."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.detach().abs().max().item())


def differs(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Different by far more than rounding could make them."""
    return bool((actual - expected).abs().max() > 10 * RTOL * expected.abs().max())


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
        assert differs(gm(**inputs)[0], reference(model, inputs)[0])
        gm.set_active_adapters(None)
        assert torch.equal(gm(**inputs)[0], reference(model, inputs)[0])


def test_only_active_adapters_act_and_compose_in_order(bert):
    """LoRA "a" (q, v) and (IA)^3 "b" (k, v, ffn_in) meet at the value projection: active as [a, b] it
    computes (W x + s B A x) * l, as [b, a] (W x) * l + s B A x. The reference is the eager model with
    those weights written by hand."""
    model, gm = bert
    inputs = inputs_for(model)
    gm.add_adapter("a", "lora")
    gm.add_adapter("b", "ia3")
    perturb_(gm.adapter_state_dict("a").values(), std=0.2, seed=1)
    perturb_(gm.adapter_state_dict("b").values(), std=0.2, seed=2)
    lora, ia3 = gm.adapter_state_dict("a"), gm.adapter_state_dict("b")
    scaling = gm.adapters["a"].scaling

    def by_hand(order: str) -> torch.Tensor:
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        with torch.no_grad():
            for key in [k for k in lora if k.endswith("lora_A")] if order == "ab" else []:
                path = key.removesuffix(".lora_A")
                params[f"{path}.weight"] += scaling * lora[f"{path}.lora_B"] @ lora[key]
            for key, l in ia3.items():
                path = key.removesuffix(".scale")
                params[f"{path}.weight"] *= l[:, None]
                params[f"{path}.bias"] *= l
            for key in [k for k in lora if k.endswith("lora_A")] if order == "ba" else []:
                path = key.removesuffix(".lora_A")
                params[f"{path}.weight"] += scaling * lora[f"{path}.lora_B"] @ lora[key]
            return torch.func.functional_call(model, params, (), inputs)[0]

    with torch.no_grad():
        base = reference(model, inputs)[0]
        gm.set_active_adapters(["a"]); only_a = gm(**inputs)[0]
        gm.set_active_adapters(["b"]); only_b = gm(**inputs)[0]
        gm.set_active_adapters(["a", "b"]); ab = gm(**inputs)[0]
        gm.set_active_adapters(["b", "a"]); ba = gm(**inputs)[0]
        gm.set_active_adapters(None); none = gm(**inputs)[0]
    assert torch.equal(none, base)
    close(ab, by_hand("ab"))
    close(ba, by_hand("ba"))
    # The orders, and each adapter alone, differ by far more than rounding.
    assert differs(ab, ba) and differs(ab, only_a) and differs(ab, only_b)
    # Merging both folds them in the order given: (W + dW) * l.
    gm.merge_adapter(["a", "b"])
    with torch.no_grad():
        close(gm(**inputs)[0], ab)


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
    close(a, b)
    assert differs(c, a)
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
        assert differs(a, b)
        assert_outputs_close(gm(**inputs), reference(model, inputs))


def test_deepcopy_keeps_adapters(bert):
    model, gm = bert
    gm.add_adapter("a", fxadapt.LoRAConfig(init_weights="bert"), set_active=True)
    clone = copy.deepcopy(gm)
    inputs = inputs_for(model)
    with torch.no_grad():
        assert torch.equal(clone(**inputs)[0], gm(**inputs)[0])  # the same weights, the same graph
    clone.merge_adapter("a")
    assert gm.merged_adapters == [] and clone.merged_adapters == ["a"]
    assert isinstance(clone, fxadapt.AdaptedModule)


def test_pickling_says_how_to_save_instead(bert, tmp_path):
    _, gm = bert
    with pytest.raises(fxadapt.errors.InputError, match="save_adapter"):
        torch.save(gm, tmp_path / "gm.pt")


# Every case also merges a LoRA; UniPELT (prefix masks, gates) and Houlsby + invertible adapters add the
# nodes that create tensors, on the three ways of positions (absolute, rotary, relative).
@pytest.mark.parametrize(("arch", "config_id"), [("bert", "houlsby+inv"), ("llama", "unipelt"), ("llama", "houlsby+inv"),
                                                 ("deberta-v2", "unipelt"), ("deberta-v2", "houlsby+inv")])
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


# -- AdapterHub's lifecycle: merge and reset ----------------------------------------------------------


@pytest.mark.parametrize("reset", ["all", "by name"])
def test_reset_after_merging_an_inactive_adapter_gives_the_base_back(bert, reset):
    """AdapterHub's run_reset_test: an adapter added but not activated, merged, reset: the output
    is the one before the merge (the base model's), and the adapter is inactive again."""
    model, gm = bert
    inputs = inputs_for(model)
    gm.add_adapter("a", fxadapt.LoRAConfig(init_weights="bert"))
    perturb_(gm.adapter_state_dict("a").values())
    code = gm.code
    with torch.no_grad():
        before = gm(**inputs)[0]
        gm.merge_adapter("a")
        assert gm.active_adapters == ["a"] and differs(gm(**inputs)[0], before)  # merged, it acts (as in AdapterHub)
        gm.reset_adapter() if reset == "all" else gm.reset_adapter("a")
        assert gm.active_adapters == [] and gm.merged_adapters == [] and gm.code == code
        assert torch.equal(gm(**inputs)[0], before) and torch.equal(before, reference(model, inputs)[0])


def test_reset_keeps_an_adapter_active_that_was_active_before_the_merge(bert):
    model, gm = bert
    inputs = inputs_for(model)
    gm.add_adapter("a", fxadapt.LoRAConfig(init_weights="bert"), set_active=True)
    gm.add_adapter("b", "ia3")
    perturb_(gm.adapter_state_dict("a").values())
    with torch.no_grad():
        unmerged = gm(**inputs)[0]
        gm.merge_adapter(["a", "b"])
        gm.reset_adapter()
        assert gm.active_adapters == ["a"]
        assert torch.equal(gm(**inputs)[0], unmerged)


# -- PEFT's dtype policy --------------------------------------------------------------------------


def _peft_adapter(kind: str, model, autocast: bool):
    import peft

    if kind == "lora":
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    else:
        config = peft.IA3Config(target_modules=["key", "value", "intermediate.dense"], feedforward_modules=["intermediate.dense"],
                                init_ia3_weights=False)
    theirs = peft.get_peft_model(model, config, autocast_adapter_dtype=autocast).eval()
    weights = {}
    for name, p in theirs.named_parameters():
        for tag, ours in (("lora_A", "lora_A"), ("lora_B", "lora_B"), ("ia3_l", "scale")):
            if f".{tag}." in name:
                weights[f"{name.removeprefix('base_model.model.').split(f'.{tag}.')[0]}.{ours}"] = p
    perturb_(weights.values(), std=0.3)
    return theirs, weights


@pytest.mark.parametrize("kind", ["lora", "ia3"])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "model-dtype"])
def test_adapters_on_a_bfloat16_model_follow_peft(kind, autocast):
    """PEFT's autocast_adapter_dtype (default True): LoRA and (IA)^3 weights on a bfloat16 model are
    float32 and the adapter computes around them; False keeps bfloat16. Same dtypes as PEFT's, and,
    with PEFT's weights, the same output up to one bfloat16 rounding."""
    model = build("bert").to(torch.bfloat16)
    ours = fxadapt.capture(copy.deepcopy(model))
    config = fxadapt.LoRAConfig(r=8, alpha=16) if kind == "lora" else fxadapt.IA3Config(input_scaling_targets=["intermediate.dense"])
    ours.add_adapter("a", config, set_active=True, autocast_adapter_dtype=autocast)
    theirs, weights = _peft_adapter(kind, model, autocast)
    state = ours.adapter_state_dict("a")
    assert sorted(state) == sorted(weights)
    assert {v.dtype for v in state.values()} == {v.dtype for v in weights.values()} == {torch.float32 if autocast else torch.bfloat16}
    with torch.no_grad():
        for key, value in weights.items():
            state[key].copy_(value.reshape(state[key].shape))
        inputs = inputs_for(model, pad=False)
        got, expected = ours(**inputs)[0], theirs(**inputs)[0]
    assert got.dtype == expected.dtype == torch.bfloat16
    close(got.float(), expected.float(), rtol=torch.finfo(torch.bfloat16).eps)


def test_a_configs_own_dtype_wins_and_full_precision_models_are_left_alone():
    model = build("bert")
    gm = fxadapt.capture(copy.deepcopy(model).to(torch.float16))
    gm.add_adapter("own", fxadapt.LoRAConfig(dtype="bfloat16"))
    gm.add_adapter("auto", "lora")
    assert {v.dtype for v in gm.adapter_state_dict("own").values()} == {torch.bfloat16}
    assert {v.dtype for v in gm.adapter_state_dict("auto").values()} == {torch.float32}
    full = fxadapt.capture(model)
    full.add_adapter("auto", "lora")
    assert {v.dtype for v in full.adapter_state_dict("auto").values()} == {torch.float32}
    with pytest.raises(fxadapt.ConfigError, match="autocast_adapter_dtype must be True or False"):
        full.add_adapter("x", "lora", autocast_adapter_dtype="yes")
