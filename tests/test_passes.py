"""Insert and fold passes in the torch.fx test template: build a tiny module, rewrite, lint, and
compare with a reference written by hand."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fxadapt
from conftest import perturb_
from fxadapt.testing import assert_outputs_close, rounding_tolerance


def example(*shape: int) -> torch.Tensor:
    """Inputs of this shape, the same in every test whatever ran before (each test seeds what it uses)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def fused_attention() -> "FusedAttention":
    torch.manual_seed(0)
    return FusedAttention()


class FusedAttention(nn.Module):
    """GPT-2-style block: one qkv projection split in three, SDPA, output projection, MLP."""

    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.out(a)
        return x + self.down(torch.relu(self.up(x)))


def rewrite(model, config, x):
    gm = fxadapt.rewrite(model, config, example_inputs=(x,))
    gm.graph.lint()
    return gm


def adapter_weights(gm) -> list[torch.Tensor]:
    """Every adapter tensor of ``gm`` (not the base weights, which are the user's model's own)."""
    return [p for name in gm.adapters for p in gm.adapter_state_dict(name).values()]


def lora_delta(gm, key_prefix):
    sd = gm.adapter_state_dict("lora")
    a, b = sd[f"{key_prefix}.lora_A"], sd[f"{key_prefix}.lora_B"]
    return b @ a


def test_lora_matches_hand_written_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = example(5, 8)
    cfg = fxadapt.LoRAConfig(r=2, alpha=6, targets=["0", "2"], selfattn_lora=False)
    gm = rewrite(model, cfg, x)
    perturb_(gm.get_submodule("0.loras.lora"))
    perturb_(gm.get_submodule("2.loras.lora"), seed=1)
    sd = gm.adapter_state_dict("lora")
    s = cfg.alpha / cfg.r

    def lora(i, h):
        lin = model[i]
        return lin(h) + s * (h @ sd[f"{i}.lora_A"].T) @ sd[f"{i}.lora_B"].T

    expected = lora(2, torch.relu(lora(0, x)))
    assert not torch.allclose(expected, model(x))  # the adapters act
    assert_outputs_close(gm(x), expected)


def test_rslora_scaling():
    cfg = fxadapt.LoRAConfig(r=4, alpha=8, use_rslora=True)
    assert cfg.scaling == 4.0
    assert fxadapt.LoRAConfig(r=4, alpha=8).scaling == 2.0


def test_fused_qkv_lora_only_touches_q_and_v_columns():
    model = fused_attention()
    x = example(2, 5, 16)
    gm = rewrite(model, fxadapt.LoRAConfig(r=2, alpha=4, attn_matrices=["q", "v"]), x)
    perturb_(adapter_weights(gm))
    sd = gm.adapter_state_dict("lora")
    assert set(sd) == {"qkv.q.lora_A", "qkv.q.lora_B", "qkv.v.lora_A", "qkv.v.lora_B"}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.qkv.weight[0:16] += 2.0 * lora_delta(gm, "qkv.q")
        reference.qkv.weight[32:48] += 2.0 * lora_delta(gm, "qkv.v")
    assert not torch.allclose(reference(x), model(x))
    # a sum of 16 products in float32, the merged weight rounded once more
    assert_outputs_close(gm(x), reference(x), rtol=rounding_tolerance(torch.float32, 32, depth=3))


def test_ia3_scales_outputs_of_k_v_and_ffn_in():
    model = fused_attention()
    x = example(2, 5, 16)
    gm = rewrite(model, fxadapt.IA3Config(), x)
    perturb_(adapter_weights(gm), std=0.5)
    sd = gm.adapter_state_dict("ia3")
    assert set(sd) == {"qkv.k.scale", "qkv.v.scale", "up.scale"}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        scale = torch.cat([torch.ones(16), sd["qkv.k.scale"], sd["qkv.v.scale"]])
        reference.qkv.weight.mul_(scale[:, None])
        reference.qkv.bias.mul_(scale)
        reference.up.weight.mul_(sd["up.scale"][:, None])
        reference.up.bias.mul_(sd["up.scale"])
    assert not torch.allclose(reference(x), model(x))
    # scaled outputs against scaled weights: the same products, rounded in another order
    assert_outputs_close(gm(x), reference(x), rtol=rounding_tolerance(torch.float32, 32, depth=3))


def test_zero_init_is_exactly_the_base():
    model = fused_attention()
    x = example(2, 5, 16)
    for config in (fxadapt.LoRAConfig(attn_matrices=["q", "k", "v", "o"], intermediate_lora=True, output_lora=True), fxadapt.IA3Config()):
        gm = rewrite(model, config, x)
        assert torch.equal(gm(x), model(x))


def test_new_nodes_carry_the_site_module_stack():
    import transformers as T
    model = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100)).eval()
    gm = fxadapt.rewrite(model, "lora")
    new = [n for n in gm.graph.nodes if n.op == "get_attr" and ".loras.lora." in n.target]
    assert len(new) == 4
    for n in new:
        path = n.target.split(".loras.")[0]
        assert list(n.meta["nn_module_stack"].values())[-1][0] == path
    for n in new:
        assert all("nn_module_stack" in u.meta for u in n.users)


def test_merged_graph_has_the_base_node_count_and_no_adapter_node():
    model = fused_attention()
    x = example(2, 5, 16)
    base = fxadapt.capture(model, (x,))
    gm = rewrite(model, fxadapt.LoRAConfig(attn_matrices=["q", "v", "o"], intermediate_lora=True), x)
    gm.add_adapter("ia3", "ia3", set_active=True)
    perturb_(adapter_weights(gm))
    before = gm(x)
    assert not torch.allclose(before, model(x))
    gm.merge_adapter(["lora", "ia3"])
    assert len(gm.graph.nodes) == len(base.graph.nodes)
    assert [n.target for n in gm.graph.nodes] == [n.target for n in base.graph.nodes]
    assert_outputs_close(gm(x), before, rtol=rounding_tolerance(torch.float32, 32, depth=3))


def test_adapter_dtype_casts_around_the_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    x = example(3, 8).to(torch.bfloat16)
    gm = rewrite(model, fxadapt.LoRAConfig(targets=["0"], selfattn_lora=False, dtype="float32"), x)
    lora = gm.get_submodule("0.loras.lora")
    assert lora.lora_A.dtype == lora.lora_B.dtype == torch.float32
    perturb_(lora)
    # by hand: the input cast to float32, the sum taken there and rounded to bfloat16 once
    s = lora.scaling
    expected = (model(x).float() + s * (x.float() @ lora.lora_A.T) @ lora.lora_B.T).to(torch.bfloat16)
    got = gm(x)
    assert got.dtype == torch.bfloat16 and not torch.equal(got, model(x))
    assert_outputs_close(got, expected, rtol=torch.finfo(torch.bfloat16).eps)  # at most one bfloat16 rounding apart


def test_lora_dropout_follows_train_and_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    x = example(4, 64)
    gm = rewrite(model, fxadapt.LoRAConfig(targets=["0"], selfattn_lora=False, dropout=0.5), x)
    perturb_(gm.get_submodule("0.loras.lora"))
    gm.eval()
    assert torch.equal(gm(x), gm(x))
    gm.train()
    torch.manual_seed(0)
    a = gm(x)
    torch.manual_seed(1)
    assert not torch.equal(a, gm(x))
