"""Issue 15, classes 4 and 7.

(4) 1x1 convolutions used as linears (SqueezeBERT's Conv1d q/k/v/o/FFN, grouped or not; a user's
    channels-first encoder with Conv2d(k=1) projections and a fused qkv split along the channel dim):
    sites with the model's own roles, LoRA and (IA)^3 on them. Oracles: PEFT in process on the same
    modules with the same weights (LoRA on Conv1d/Conv2d, grouped too; (IA)^3 on Conv2d); for (IA)^3
    on Conv1d, which PEFT does not adapt, the scaled kernels written by hand on a deep copy. Merged ==
    unmerged, reset bit for bit; LoRA on a grouped convolution does not merge (its update reads every
    input channel, as in PEFT), and a rank the groups do not divide is refused.
(7) Prefix tuning on torch.nn.TransformerEncoder (sequence-first attention inside
    nn.MultiheadAttention): against the layers written out by hand with the same prefixes
    concatenated before the keys and values.
"""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch
import transformers as T
from torch import nn

import fxadapt
from fxadapt.errors import ConfigError, MergeError, SiteError
from fxadapt.testing import relative_error, rounding_tolerance

H = 32
TOL = rounding_tolerance(torch.float32, 64, depth=2)


def squeezebert(groups: int):
    """(model, inputs, a fresh copy of its capture)."""
    model, inputs, gm = _squeezebert(groups)
    return model, inputs, copy.deepcopy(gm)


@functools.lru_cache(maxsize=None)
def _squeezebert(groups: int):
    cfg = T.SqueezeBertConfig(vocab_size=100, hidden_size=H, embedding_size=H, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              **{f"{k}_groups": groups for k in ("q", "k", "v", "post_attention", "intermediate", "output")})
    torch.manual_seed(0)
    model = T.SqueezeBertModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(3, 100, (2, 9), generator=g), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    return model, inputs, fxadapt.capture(model, example_kwargs=inputs)


class ConvEncoder(nn.Module):
    """A user's channels-first encoder: (N, C, H, W) tokens over H*W, Conv2d(k=1) projections, a fused qkv."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.layers = nn.ModuleList(nn.ModuleDict(dict(n1=nn.GroupNorm(1, d), qkv=nn.Conv2d(d, 3 * d, 1), o=nn.Conv2d(d, d, 1), n2=nn.GroupNorm(1, d),
                                                       up=nn.Conv2d(d, 2 * d, 1), down=nn.Conv2d(2 * d, d, 1))) for _ in range(2))

    def forward(self, x):
        n, c, h, w = x.shape
        for l in self.layers:
            q, k, v = (t.reshape(n, self.heads, c // self.heads, h * w).transpose(-1, -2) for t in l["qkv"](l["n1"](x)).chunk(3, dim=1))
            a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(n, c, h, w)
            x = x + l["o"](a)
            x = x + l["down"](nn.functional.gelu(l["up"](l["n2"](x))))
        return x


def conv_encoder():
    torch.manual_seed(0)
    model = ConvEncoder().eval()
    x = torch.randn(2, 16, 3, 4, generator=torch.Generator().manual_seed(1))
    return model, (x,), fxadapt.capture(model, (x,))


def _roles(gm) -> dict[tuple[int, str], str]:
    return {(s.layer, s.role): s.name for s in gm.sites()}


@pytest.mark.parametrize("groups", [1, 2])
def test_squeezebert_convolutions_are_sites_with_their_roles(groups):
    _, _, gm = squeezebert(groups)
    own = {"q": "attention.query", "k": "attention.key", "v": "attention.value", "o": "post_attention.conv1d",
           "ffn_in": "intermediate.conv1d", "ffn_out": "output.conv1d"}
    assert _roles(gm) == {(l, r): f"encoder.layers.{l}.{m}" for l in (0, 1) for r, m in own.items()}  # the pooler is no site
    assert {(s.linear.groups, s.linear.channel_dim) for s in gm.sites()} == {(groups, -2)}


def test_a_fused_conv2d_projection_splits_by_channels():
    _, _, gm = conv_encoder()
    cols = {"q": range(0, 16), "k": range(16, 32), "v": range(32, 48)}
    for s in gm.sites():
        assert s.path == f"layers.{s.layer}." + {"o": "o", "ffn_in": "up", "ffn_out": "down"}.get(s.role, "qkv")
        assert s.columns == cols.get(s.role)
    assert len(gm.sites()) == 12


def _randomise(gm, name: str) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for pname, p in gm.named_parameters():
            if f".{name}." in pname and ("lora_B" in pname or "scale" in pname):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "scale" in pname else 0.0))


def _peft_lora(gm, model, name: str, r: int):
    """PEFT's LoRA on the modules our placements adapt, with our weights (kernels of size 1 added)."""
    placements = gm._adapter(name).placements
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=sorted({p.site.path for p in placements})))
    for p in placements:
        w, layer = gm.get_submodule(p.module), pm.base_model.model.get_submodule(p.site.path)
        with torch.no_grad():
            for ours, theirs in ((w.lora_A, layer.lora_A["default"].weight), (w.lora_B, layer.lora_B["default"].weight)):
                theirs.copy_(ours.reshape(theirs.shape))
    return pm


def _grads(module, out, name_part: str) -> dict[str, torch.Tensor]:
    module.zero_grad()
    out.pow(2).mean().backward()
    return {n: p.grad.reshape(p.shape[0], p.shape[1]) for n, p in module.named_parameters() if name_part in n and p.grad is not None}


@pytest.mark.parametrize("groups", [1, 2])
def test_lora_on_squeezebert_matches_peft(groups):
    model, inputs, gm = squeezebert(groups)
    gm.add_adapter("a", fxadapt.LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True), set_active=True)
    _randomise(gm, "a")
    pm = _peft_lora(gm, model, "a", 4)
    ours, theirs = gm(**inputs).last_hidden_state, pm(**inputs).last_hidden_state
    assert relative_error(ours, theirs) <= TOL
    g_ours, g_theirs = _grads(gm, ours, "lora_"), _grads(pm, theirs, "lora_")
    assert len(g_ours) == len(g_theirs) == 20  # q, k, v, ffn_in, ffn_out of two layers
    by_module = {n.replace(".default", "").replace(".weight", ""): g for n, g in g_theirs.items()}
    for n, g in g_ours.items():
        path, _, param = n.rpartition(".")
        site = path.split(".loras.")[0]
        assert relative_error(g, by_module["base_model.model." + site + "." + param]) <= TOL, n
    if groups == 1:
        before = {k: v.clone() for k, v in gm.state_dict().items() if "conv1d" in k or "attention" in k}
        with torch.no_grad():
            gm.merge_adapter("a")
            merged = gm(**inputs).last_hidden_state
            gm.reset_adapter("a")
        assert relative_error(merged, ours) <= TOL
        assert all(torch.equal(gm.state_dict()[k], v) for k, v in before.items())
    else:
        # B A reads every input channel, a grouped kernel only its group's: PEFT does not merge it either.
        with pytest.raises(MergeError, match="groups=2"):
            gm.merge_adapter("a")
        assert gm.merged_adapters == [] and torch.equal(gm(**inputs).last_hidden_state, ours.detach())


@pytest.mark.parametrize("groups", [1, 2])
def test_lora_on_convolutions_in_peft_format_both_ways(groups, tmp_path):
    """PEFT keeps a convolution's LoRA with its kernel dims ((r, in, 1) and (out, r / groups, 1)): what
    fxadapt writes loads in PEFT with PEFT's outputs, and PEFT's file loads back bit for bit."""
    model, inputs, gm = squeezebert(groups)
    gm.add_adapter("a", fxadapt.LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"], intermediate_lora=True), set_active=True)
    _randomise(gm, "a")
    gm.save_adapter(tmp_path / "ours", "a", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        ours = gm(**inputs).last_hidden_state
        assert relative_error(theirs(**inputs).last_hidden_state, ours) <= TOL
    theirs.save_pretrained(tmp_path / "theirs")
    name = gm.load_adapter(tmp_path / "theirs", "b", set_active=False)
    assert {k: v.shape for k, v in gm.adapter_state_dict(name).items()} == {k: v.shape for k, v in gm.adapter_state_dict("a").items()}
    assert all(torch.equal(v, gm.adapter_state_dict("a")[k]) for k, v in gm.adapter_state_dict(name).items())
    gm.add_adapter("i", fxadapt.IA3Config())
    with pytest.raises(fxadapt.CheckpointError, match="1x1 convolution"):
        gm.save_adapter(tmp_path / "ia3", "i", format="peft")


def test_lora_rank_must_divide_into_the_groups():
    _, _, gm = squeezebert(2)
    with pytest.raises(ConfigError, match="groups=2") as info:
        gm.add_adapter("a", fxadapt.LoRAConfig(r=3))
    assert info.value.field == "r" and gm.adapters == {}


def _ia3_by_hand(model, gm, name: str):
    """A deep copy with each adapted kernel scaled: output channels (and bias) by l, or, on the
    input side, each output row's input channels (its group's) by l."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in gm._adapter(name).placements:
            conv, l = ref.get_submodule(p.site.path), gm.get_submodule(p.module).vector().detach()
            if p.side == "output":
                conv.weight.mul_(l[:, None, None])
                conv.bias.mul_(l)
            else:
                per_group = conv.in_channels // conv.groups
                rows = conv.out_channels // conv.groups
                for o in range(conv.out_channels):
                    g = o // rows
                    conv.weight[o, :, 0] *= l[g * per_group:(g + 1) * per_group]
    return ref


def test_ia3_on_grouped_conv1d_against_scaled_kernels():
    model, inputs, gm = squeezebert(2)
    gm.add_adapter("i", fxadapt.IA3Config(input_scaling_targets=r".*output\.conv1d"), set_active=True)  # k, v, ffn_in; ffn_out inputs
    assert {p.side for p in gm._adapter("i").placements} == {"input", "output"}
    _randomise(gm, "i")
    ours = gm(**inputs).last_hidden_state.detach()
    expected = _ia3_by_hand(model, gm, "i")(**inputs).last_hidden_state
    assert relative_error(ours, expected) <= TOL
    originals = {k: v.clone() for k, v in gm.state_dict().items() if "conv1d" in k or "attention" in k}
    with torch.no_grad():
        gm.merge_adapter("i")  # block-diagonal scaled stays block-diagonal: exact
        assert relative_error(gm(**inputs).last_hidden_state, ours) <= TOL
        gm.reset_adapter("i")
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in originals.items())


def test_conv2d_encoder_lora_and_ia3_match_peft():
    model, (x,), gm = conv_encoder()
    # LoRA on whole modules (the fused qkv too) and (IA)^3 on the outputs, each against PEFT.
    gm.add_adapter("a", fxadapt.LoRAConfig(r=2, alpha=4, selfattn_lora=False, targets=r"layers\.\d\.(qkv|o|up|down)"), set_active=True)
    _randomise(gm, "a")
    ours = gm(x)
    pm = _peft_lora(gm, model, "a", 2)
    assert relative_error(ours, pm(x)) <= TOL
    gm.delete_adapter("a")
    gm.add_adapter("i", fxadapt.IA3Config(selfattn_lora=False, targets=r"layers\.\d\.(qkv|up)"), set_active=True)
    _randomise(gm, "i")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(target_modules=r".*\.(qkv|up)", feedforward_modules=[]))
    with torch.no_grad():
        for p in gm._adapter("i").placements:
            pm.base_model.model.get_submodule(p.site.path).ia3_l["default"].copy_(gm.get_submodule(p.module).scale.reshape(1, -1, 1, 1))
    assert relative_error(gm(x), pm(x)) <= TOL


def test_lora_on_one_role_of_a_fused_conv_merges_into_its_channels():
    _, (x,), gm = conv_encoder()
    gm.add_adapter("a", fxadapt.LoRAConfig(r=2, attn_matrices=["q", "v"]), set_active=True)
    base = copy.deepcopy(gm)
    base.set_active_adapters(None)
    _randomise(gm, "a")
    ours = gm(x).detach()
    # Only q's and v's output channels of qkv move; merged acts as unmerged.
    with torch.no_grad():
        gm.merge_adapter("a")
        merged = gm.state_dict()["layers.0.qkv.weight"] - base.state_dict()["layers.0.qkv.weight"]
        assert merged[16:32].abs().max() == 0 and merged[:16].abs().max() > 0 and merged[32:].abs().max() > 0
        assert relative_error(gm(x), ours) <= TOL
        gm.reset_adapter("a")
    assert torch.equal(gm.state_dict()["layers.0.qkv.weight"], base.state_dict()["layers.0.qkv.weight"])


def test_methods_that_compute_features_last_refuse_convolutions():
    _, _, gm = squeezebert(1)
    with pytest.raises(SiteError, match="1x1 convolution"):
        gm.add_adapter("d", fxadapt.DoRAConfig(r=4))
    with pytest.raises(ConfigError, match="use_gating") as info:
        gm.add_adapter("g", fxadapt.LoRAConfig(r=4, use_gating=True))
    assert info.value.field == "use_gating"
    with pytest.raises(SiteError, match="channels in dim -2"):  # blocks sum a channels-first stream
        gm.add_adapter("b", "seq_bn")
    assert gm.adapters == {}


# -- (7) prefix tuning on nn.TransformerEncoder --------------------------------------------------


def _encoder(batch_first: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(H, 4, 64, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(1))
    return model, (x if batch_first else x.transpose(0, 1))


def _prefixed_by_hand(model, x, pool, batch_first: bool):
    """The post-LN layers written out, layer l's prefix keys / values (pool[2l], pool[2l+1]:
    (heads, P, head_dim)) before the keys and values of every example."""
    h = x if batch_first else x.transpose(0, 1)
    n, s, d = h.shape
    for i, layer in enumerate(model.layers):
        att = layer.self_attn
        q, k, v = (t.view(n, s, 4, d // 4).transpose(1, 2) for t in nn.functional.linear(h, att.in_proj_weight, att.in_proj_bias).chunk(3, -1))
        k = torch.cat([pool[2 * i].expand(n, -1, -1, -1), k], 2)
        v = torch.cat([pool[2 * i + 1].expand(n, -1, -1, -1), v], 2)
        a = att.out_proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, s, d))
        h = layer.norm1(h + a)
        h = layer.norm2(h + layer.linear2(torch.relu(layer.linear1(h))))
    return h if batch_first else h.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_prefix_tuning_on_torch_transformer_encoder(batch_first):
    model, x = _encoder(batch_first)
    gm = fxadapt.capture(model, (x,))
    assert [a.batch_first for a in gm._fx_anatomy.attentions] == [False, False]  # MultiheadAttention runs sequence-first
    gm.add_adapter("p", fxadapt.PrefixTuningConfig(prefix_length=3, bottleneck_size=16), set_active=True)
    out = gm(x)
    pool = gm.get_submodule(gm._adapter("p").placements[0].shared[0])().detach()
    expected = _prefixed_by_hand(model, x, pool, batch_first)
    assert relative_error(out, expected) <= TOL
    assert relative_error(out, model(x)) > 1e-3  # the prefixes change the output
    with pytest.raises(SiteError, match="sequence-first"):
        gm.add_adapter("g", fxadapt.PrefixTuningConfig(prefix_length=3, use_gating=True))
