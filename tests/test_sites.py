"""Site discovery by dataflow, on every architecture, without module names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxadapt
from conftest import ARCHS, captured

# (roles per layer, number of layers) every architecture must show
EXPECTED_ROLES = {
    arch: ["q", "k", "v", "o", "ffn_in", "ffn_out"] for arch in ARCHS
}
for gated in ("llama", "qwen2"):
    EXPECTED_ROLES[gated] = ["q", "k", "v", "o", "ffn_in", "ffn_in", "ffn_out"]

# The module path each role has in each architecture: the oracle is the model's own naming,
# which the discovery never reads.
PATHS = {
    "bert": {"q": "encoder.layer.{}.attention.self.query", "k": "encoder.layer.{}.attention.self.key", "v": "encoder.layer.{}.attention.self.value",
             "o": "encoder.layer.{}.attention.output.dense", "ffn_in": "encoder.layer.{}.intermediate.dense", "ffn_out": "encoder.layer.{}.output.dense"},
    "distilbert": {"q": "transformer.layer.{}.attention.q_lin", "k": "transformer.layer.{}.attention.k_lin", "v": "transformer.layer.{}.attention.v_lin",
                   "o": "transformer.layer.{}.attention.out_lin", "ffn_in": "transformer.layer.{}.ffn.lin1", "ffn_out": "transformer.layer.{}.ffn.lin2"},
    "deberta-v2": {"q": "encoder.layer.{}.attention.self.query_proj", "k": "encoder.layer.{}.attention.self.key_proj",
                   "v": "encoder.layer.{}.attention.self.value_proj", "o": "encoder.layer.{}.attention.output.dense",
                   "ffn_in": "encoder.layer.{}.intermediate.dense", "ffn_out": "encoder.layer.{}.output.dense"},
    "gpt2": {"q": "h.{}.attn.c_attn", "k": "h.{}.attn.c_attn", "v": "h.{}.attn.c_attn", "o": "h.{}.attn.c_proj",
             "ffn_in": "h.{}.mlp.c_fc", "ffn_out": "h.{}.mlp.c_proj"},
    "llama": {"q": "model.layers.{}.self_attn.q_proj", "k": "model.layers.{}.self_attn.k_proj", "v": "model.layers.{}.self_attn.v_proj",
              "o": "model.layers.{}.self_attn.o_proj", "ffn_out": "model.layers.{}.mlp.down_proj"},
    "t5-encoder": {"q": "encoder.block.{}.layer.0.SelfAttention.q", "v": "encoder.block.{}.layer.0.SelfAttention.v",
                   "o": "encoder.block.{}.layer.0.SelfAttention.o", "ffn_in": "encoder.block.{}.layer.1.DenseReluDense.wi",
                   "ffn_out": "encoder.block.{}.layer.1.DenseReluDense.wo"},
    "phi3": {"q": "layers.{}.self_attn.qkv_proj", "o": "layers.{}.self_attn.o_proj", "ffn_in": "layers.{}.mlp.gate_up_proj",
             "ffn_out": "layers.{}.mlp.down_proj"},
}


def test_every_architecture_has_every_role_in_every_layer(arch):
    _, gm = captured(arch)
    sites = gm.sites()
    for layer in (0, 1):
        roles = [s.role for s in sites if s.layer == layer]
        assert roles == EXPECTED_ROLES[arch], (arch, layer, roles)
    assert {s.layer for s in sites} == {0, 1}


@pytest.mark.parametrize("arch", sorted(PATHS))
def test_roles_land_on_the_right_modules(arch):
    _, gm = captured(arch)
    by = {(s.layer, s.role): s.path for s in gm.sites()}
    for role, pattern in PATHS[arch].items():
        for layer in (0, 1):
            assert by[(layer, role)] == pattern.format(layer)


def test_gated_ffn_has_gate_and_up_as_ffn_in():
    _, gm = captured("llama")
    ffn_in = sorted(s.path for s in gm.sites() if s.role == "ffn_in" and s.layer == 0)
    assert ffn_in == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("arch, roles", [("gpt2", {"q": range(0, 32), "k": range(32, 64), "v": range(64, 96)}),
                                         ("phi3", {"q": range(0, 32), "k": range(32, 64), "v": range(64, 96)})])
def test_fused_projections_split_into_column_ranges(arch, roles):
    _, gm = captured(arch)
    for s in gm.sites():
        if s.layer == 0 and s.role in roles:
            assert s.columns == roles[s.role]
            assert s.out_features == 32


def test_interleaved_fused_projection_columns():
    # DeBERTa's in_proj is viewed as (heads, 3 * head_dim) and chunked: q, k, v interleave per head.
    _, gm = captured("deberta")
    cols = {s.role: list(s.columns) for s in gm.sites() if s.layer == 0 and s.role in "qkv"}
    head_dim, heads = 8, 4
    for i, role in enumerate("qkv"):
        expected = [h * 3 * head_dim + i * head_dim + d for h in range(heads) for d in range(head_dim)]
        assert cols[role] == expected


def test_grouped_query_attention_shapes():
    _, gm = captured("llama")
    shapes = {s.role: (s.in_features, s.out_features) for s in gm.sites() if s.layer == 0}
    assert shapes["q"] == (32, 32) and shapes["k"] == (32, 16) and shapes["v"] == (32, 16)


def test_classification_head_is_not_an_ffn():
    import transformers as T
    torch.manual_seed(0)
    model = T.RobertaForSequenceClassification(T.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                                intermediate_size=64, vocab_size=100, max_position_embeddings=64, num_labels=3))
    gm = fxadapt.capture(model)
    assert not any(s.path.startswith("classifier") for s in gm.sites())
    assert len(gm.sites()) == 12


def test_cross_attention_roles():
    import transformers as T
    torch.manual_seed(0)
    model = T.BartModel(T.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64))
    gm = fxadapt.capture(model)
    by = {(s.layer, s.role): s.path for s in gm.sites()}
    assert by[(1, "cross_q")] == "decoder.layers.0.encoder_attn.q_proj"
    assert by[(1, "cross_k")] == "decoder.layers.0.encoder_attn.k_proj"
    assert by[(1, "q")] == "decoder.layers.0.self_attn.q_proj"
    assert by[(0, "ffn_out")] == "encoder.layers.0.fc2"


# -- a small transformer written here, then with every module renamed ---------------------------


class Block(nn.Module):
    def __init__(self, d: int, names: dict[str, str]):
        super().__init__()
        self.names = names
        for role, name in names.items():
            shape = {"up": (d, 4 * d), "down": (4 * d, d)}.get(role, (d, d))
            self.add_module(name, nn.Linear(*shape) if role not in ("ln1", "ln2") else nn.LayerNorm(d))

    def sub(self, role):
        return getattr(self, self.names[role])

    def forward(self, x):
        b, s, d = x.shape
        h = self.sub("ln1")(x)
        q, k, v = (self.sub(r)(h).view(b, s, 4, d // 4).transpose(1, 2) for r in ("q", "k", "v"))
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.sub("o")(a)
        return x + self.sub("down")(nn.functional.gelu(self.sub("up")(self.sub("ln2")(x))))


class Tiny(nn.Module):
    def __init__(self, names: dict[str, str], d: int = 16, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, names) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


PLAIN = {"q": "q", "k": "k", "v": "v", "o": "o", "up": "up", "down": "down", "ln1": "ln1", "ln2": "ln2"}
RENAMED = {"q": "zeta", "k": "alpha", "v": "mu", "o": "down_proj", "up": "query", "down": "key", "ln1": "w7", "ln2": "w8"}


@pytest.mark.parametrize("front_end", ["export", "symbolic_trace"])
def test_renaming_every_module_gives_the_same_sites(front_end):
    def sites(names):
        torch.manual_seed(0)
        model = Tiny(names)
        gm = fxadapt.capture(model, (torch.randn(2, 5, 16),)) if front_end == "export" else fxadapt.capture(model)
        inverse = {v: k for k, v in names.items()}
        return [(s.layer, s.role, s.path.rsplit(".", 1)[0], inverse[s.path.rsplit(".", 1)[1]]) for s in gm.sites()]

    plain, renamed = sites(PLAIN), sites(RENAMED)
    assert plain == renamed
    assert [(l, r, m) for l, r, _, m in plain if l == 0] == [
        (0, "q", "q"), (0, "k", "k"), (0, "v", "v"), (0, "o", "o"), (0, "ffn_in", "up"), (0, "ffn_out", "down")]


def test_targets_regex_adds_any_linear():
    model, gm = captured("bert")
    gm.add_adapter("pool", fxadapt.LoRAConfig(targets=r"pooler\.dense", selfattn_lora=False))
    try:
        paths = {k.rsplit(".", 1)[0] for k in gm.adapter_state_dict("pool")}
        assert paths == {"pooler.dense"}
    finally:
        gm.delete_adapter("pool")


def test_targets_names_match_suffixes_like_peft():
    _, gm = captured("bert")
    gm.add_adapter("t", fxadapt.LoRAConfig(targets=["query", "value"], selfattn_lora=False))
    try:
        paths = sorted({k.rsplit(".", 1)[0] for k in gm.adapter_state_dict("t")})
        assert paths == [f"encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    finally:
        gm.delete_adapter("t")


def test_missing_role_lists_the_sites():
    model = nn.Sequential(nn.Linear(4, 4))
    gm = fxadapt.capture(model, (torch.randn(2, 4),))
    # the whole message: which roles were asked for, that the model has none, and what to do
    with pytest.raises(fxadapt.SiteError, match=r"^LoRAConfig asks for role\(s\) \['q', 'v'\] but Sequential has none; .*Use targets= "):
        gm.add_adapter("x", fxadapt.LoRAConfig())
    with pytest.raises(fxadapt.SiteError, match=r"^targets='nothing' matches no linear of Sequential; its linears: 0\.weight$"):
        gm.add_adapter("x", fxadapt.LoRAConfig(targets="nothing", selfattn_lora=False))
    assert gm.adapters == {}
