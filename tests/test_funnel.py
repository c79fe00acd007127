"""Pooling or downsampling between blocks (issue 15, class 5's second half), found by rules on the graph:

- Funnel's relative attention (scores and values products written as einsums) is attention; the first
  layer of each block after the first reads a pooled query and unpooled keys, which is still
  self-attention (the query's input derives from the keys' input through no projection).
- Its residual blocks close on the pooled stream, and a post-LN block's norm stops where the sequence
  changes: the pooling (FunnelBaseModel) and the decoder's upsampling (FunnelModel) read the adapted
  stream, instead of being copied into the adapter's output (the shape mismatch of issue 15).
- One more model: SegFormer (strided patch embeddings between stages, keys and values read a spatially
  reduced map): self-attention per stage, not cross-attention.

Oracles: the models' own module names for each role; PEFT in process for LoRA on the same modules;
AdapterHub's placement (Pfeiffer ``LN(A(LN(z)) + z)`` on a post-LN sum z, ``A(z) + z`` pre-LN;
Houlsby ``A(h) + h`` on each sublayer output h) written as forward hooks on the eager model.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import transformers as T

import fxadapt
from conftest import assert_lora_matches_peft
from fxadapt.testing import assert_outputs_close, relative_error, rounding_tolerance
from test_references import _first, _replace_first, adapter_weights, body_by_hand, randomise_

FUNNEL = dict(vocab_size=100, d_model=32, n_head=4, d_head=8, d_inner=64, max_position_embeddings=64)
MODELS = {
    # block 1 pools its first layer's query; its second layer reads the pooled stream
    "funnel-base": lambda: T.FunnelBaseModel(T.FunnelConfig(**FUNNEL, block_sizes=[1, 2])),
    # encoder pools, the decoder upsamples back and adds the first block's output
    "funnel": lambda: T.FunnelModel(T.FunnelConfig(**FUNNEL, block_sizes=[1, 1], num_decoder_layers=1)),
    "segformer": lambda: T.SegformerModel(T.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                                            num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2])),
}
# The module of each layer, in order; the roles' modules inside it.
LAYERS = {"funnel-base": ["encoder.blocks.0.0", "encoder.blocks.1.0", "encoder.blocks.1.1"],
          "funnel": ["encoder.blocks.0.0", "encoder.blocks.1.0", "decoder.layers.0"],
          "segformer": ["stages.0.blocks.0", "stages.1.blocks.0"]}
FUNNEL_ROLES = {"q": "attention.q_head", "k": "attention.k_head", "v": "attention.v_head", "o": "attention.post_proj",
                "ffn_in": "ffn.linear_1", "ffn_out": "ffn.linear_2"}
ROLES = {"funnel-base": FUNNEL_ROLES, "funnel": FUNNEL_ROLES,
         "segformer": {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj",
                       "ffn_in": "mlp.fc1", "ffn_out": "mlp.fc2"}}
RTOL = rounding_tolerance(torch.float32, 64, depth=3)


def _inputs(model) -> dict:
    g = torch.Generator().manual_seed(1)
    if model.main_input_name == "pixel_values":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(3, 100, (2, 9), generator=g), "attention_mask": torch.ones(2, 9, dtype=torch.long)}


@functools.lru_cache(maxsize=None)
def _captured(name: str):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    inputs = _inputs(model)
    return model, inputs, fxadapt.capture(model, example_kwargs=inputs, dynamic_shapes={k: None for k in inputs})


def _path(name: str, layer: int, role: str) -> str:
    return f"{LAYERS[name][layer]}.{ROLES[name][role]}"


@pytest.mark.parametrize("name", list(MODELS))
def test_roles_land_on_the_models_own_modules(name):
    _, _, gm = _captured(name)
    found = {(s.layer, s.role): s.path for s in gm.sites()}
    layers = range(len(LAYERS[name]))
    assert found == {(i, r): _path(name, i, r) for i in layers for r in ROLES[name]}
    assert [a.layer for a in gm._fx_attentions] == list(layers) and not any(a.cross for a in gm._fx_attentions)
    assert [(b.layer, b.location) for b in gm._fx_blocks] == [(i, loc) for i in layers for loc in ("mh", "output")]


def test_pooled_blocks_close_on_the_pooled_stream_and_norms_stop_at_the_pooling():
    _, inputs, gm = _captured("funnel")
    by_name = {n.name: n for n in gm.graph.nodes}
    blocks = gm._fx_blocks
    # Post-LN: each norm is the sublayer's one LayerNorm; the pooling and upsampling are not in it.
    assert all(len(b.norm) == 1 and by_name[b.norm[0]].target == torch.ops.aten.layer_norm.default for b in blocks)
    # The pooled layer's attention block adds the pooled query stream: fewer positions than the input.
    pooled = next(b for b in blocks if (b.layer, b.location) == (1, "mh"))
    assert by_name[pooled.residual].meta["val"].shape[1] < inputs["input_ids"].shape[1]
    assert by_name[pooled.residual].meta["val"].shape == by_name[pooled.add].meta["val"].shape


# -- LoRA against PEFT on the same modules -------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_lora_matches_peft_on_the_same_modules(name):
    model, inputs, gm = _captured(name)
    config = fxadapt.LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v", "o"], intermediate_lora=True, output_lora=True)
    targets = sorted({s.path for s in gm.sites()})
    assert_lora_matches_peft(model, inputs, gm, config, targets, RTOL)


# -- bottleneck adapters at AdapterHub's positions -----------------------------------------------

# Where the sublayers' outputs h are (Houlsby), and what Pfeiffer reads: the post-LN sum's norm
# (its input z = h + r) or, pre-LN, the layer whose output is the sum z.
SUBLAYERS = {"mh": "o", "output": "ffn_out"}
PFEIFFER = {"funnel-base": ("norm", "ffn.layer_norm"), "funnel": ("norm", "ffn.layer_norm"), "segformer": ("sum", "")}


@contextlib.contextmanager
def bottleneck_by_hooks(name: str, model, w: dict, config):
    handles = []
    for i, layer in enumerate(LAYERS[name]):
        for location, role in SUBLAYERS.items():
            if not getattr(config, f"{location}_adapter"):
                continue
            body = body_by_hand(w, _path(name, i, role), config)
            kind, where = PFEIFFER[name]
            if not config.original_ln_before:  # Houlsby: A(h) + h, before the add
                module, fn = _path(name, i, role), lambda mod, args, out, body=body: out + body(out)
            elif kind == "norm":  # post-LN Pfeiffer: LN(A(LN(z)) + z), the norm's forward without its hooks
                module, fn = f"{layer}.{where}", lambda mod, args, out, body=body: mod.forward(body(out) + args[0])
            else:  # pre-LN Pfeiffer: A(z) + z
                module, fn = layer, lambda mod, args, out, body=body: _replace_first(out, _first(out) + body(_first(out)))
            handles.append(model.get_submodule(module).register_forward_hook(fn))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("config", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("name", list(MODELS))
def test_bottleneck_sits_where_adapterhub_puts_it(name, config):
    model, inputs, gm = _captured(name)
    gm.add_adapter("bn", config, set_active=True)
    try:
        randomise_(gm, "bn", std=0.3)
        with torch.no_grad():
            got, base = gm(**inputs)[0], model(**inputs)[0]
            with bottleneck_by_hooks(name, model, adapter_weights(gm, "bn"), gm.adapters["bn"]):
                expected = model(**inputs)[0]
        assert relative_error(base, expected) > 100 * RTOL, "the adapter hardly changes the output"
        assert_outputs_close(got, expected, rtol=RTOL)
    finally:
        gm.delete_adapter("bn")


def test_prefix_tuning_refuses_einsum_attention_and_changes_nothing():
    """Funnel's relative attention multiplies keys with einsum: prefix tuning cannot extend them, and
    says so at add_adapter, naming the layer and the leave_out that skips it."""
    _, _, gm = _captured("funnel-base")
    with pytest.raises(fxadapt.SiteError, match=r"layer 0 .* einsum .* leave_out=\[0\]"):
        gm.add_adapter("p", fxadapt.PrefixTuningConfig(prefix_length=2))
    assert gm.adapters == {}
