"""Hand-written references for the architectures without AdapterHub fixtures: the same computation
written plainly on the eager model, with the adapter weights read from ``gm.adapter_state_dict``.

- Prefix tuning: each self-attention's keys and values get the layer's prefix in front, the mask P
  visible columns and score-shaped biases (T5's relative positions, BLOOM's ALiBi) P zero columns,
  in the model's own eager attention (patched) or in a copied attention forward (DeBERTa, BLOOM, Falcon).
- LoRA: ``W x + scaling * B A x`` added by forward hooks, on the right columns of a fused projection
  (Falcon's multi-query query_key_value, BLOOM's and DeBERTa's interleaved ones); ALBERT's shared
  projections keep one LoRA each (as AdapterHub's and PEFT's wrapped modules do), applied at every
  layer that calls them.
- Bottleneck adapters (AdapterHub's ``pre_forward`` / ``post_forward``): with A the adapter body and
  ``z = h + r`` (sublayer output h, residual r), Houlsby ``LN(A(h) + h + r)``, Pfeiffer
  ``LN(A(LN(z)) + z)`` (pre-LN: ``A(z) + z``), parallel ``LN(A(r) + h + r)``; in a parallel-residual
  layer (GPT-J, Falcon) a sequential adapter turns its sublayer output s into ``A(s) + s``. Inserted by
  forward hooks at those modules; ALBERT's repeated layer has one adapter per repetition.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from conftest import captured, inputs_for, reference
from fxadapt.config import CompacterPlusPlusConfig, LoRAConfig, PrefixTuningConfig
from fxadapt.testing import assert_outputs_close, relative_error, rounding_tolerance
from test_architectures import MODELS, capture_of

# float32 rounding of the same sums in another order (SDPA or eager attention, hooks), reductions of
# up to 128 terms (the feed-forward width) through two layers.
RTOL = rounding_tolerance(torch.float32, 128, depth=2)


def model_and_capture(arch: str):
    """(eager model, shared capture) from test_architectures' models or conftest's builders."""
    return capture_of(arch)[1:] if arch in MODELS else captured(arch)


def randomise_(gm, name: str, seed: int = 0, std: float = 0.5) -> None:
    """Every tensor of the adapter set to random non-zero values, so that the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in gm.adapter_state_dict(name).values():
            t.copy_((torch.randn(t.shape, generator=g) * std).to(t.dtype))


def adapter_weights(gm, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights as the references read them: detached copies."""
    return {k: v.detach().clone() for k, v in gm.adapter_state_dict(name).items()}


def assert_matches(gm, model, inputs: dict, patch) -> None:
    """fxadapt's output equals the eager model's under ``patch`` (a context manager), on the positions
    the mask keeps, relative to the values compared; and the adapter moved the output."""
    with torch.no_grad():
        got = gm(**inputs)[0]
        base = reference(model, inputs)[0]
        with patch:
            expected = reference(model, inputs)[0]
    keep = inputs["attention_mask"][..., None].to(got.dtype)
    assert relative_error(base * keep, expected * keep) > 100 * RTOL, "the adapter hardly changes the output"
    assert_outputs_close(got, expected, rtol=RTOL, mask=inputs["attention_mask"])


@contextlib.contextmanager
def eager(model):
    """The model with transformers' eager attention (the reference's attention code)."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    try:
        yield
    finally:
        model.set_attn_implementation(before)


# -- prefix tuning ---------------------------------------------------------------------------------


def prefixes_by_hand(w: dict, config: PrefixTuningConfig, layers: int, heads: int, head_dim: int) -> list:
    """AdapterHub's prefixes: Embedding(P) -> Linear -> tanh -> Linear (or the flat values), viewed
    (P, layers * 2, heads, head_dim); layer l's keys are slot 2l, its values 2l + 1."""
    if config.flat:
        flat = w["prefix_tunings.control_trans"]
    else:
        assert config.non_linearity == "tanh"
        h = torch.tanh(F.linear(w["prefix_tunings.wte.weight"], w["prefix_tunings.control_trans.0.weight"], w["prefix_tunings.control_trans.0.bias"]))
        flat = F.linear(h, w["prefix_tunings.control_trans.2.weight"], w["prefix_tunings.control_trans.2.bias"])
    kv = flat.reshape(config.prefix_length, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
    return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(layers)]


def with_prefix(k, v, key, value):
    """Keys and values (batch, heads, seq, head_dim) with the prefix put in front."""
    b = key.shape[0]
    return torch.cat([k.expand(b, -1, -1, -1), key], -2), torch.cat([v.expand(b, -1, -1, -1), value], -2)


def pad_mask(mask, p: int):
    """A mask over P more keys, in front: visible (True, or 0 when additive)."""
    return None if mask is None else F.pad(mask, (p, 0), value=True if mask.dtype == torch.bool else 0.0)


def masked(scores, mask):
    """Scores with a boolean (True: visible) or additive mask applied."""
    if mask is None:
        return scores
    return scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask


@contextlib.contextmanager
def prefix_in_eager_attention(model, prefixes):
    """The model's own ``eager_attention_forward`` with each call's keys and values prefixed (the i-th
    call is layer i: ALBERT calls its one attention once per layer)."""
    module = sys.modules[type(model).__module__]
    original, calls = module.eager_attention_forward, []

    def attention(attn, query, key, value, mask, *args, **kwargs):
        k, v = prefixes[len(calls)]
        calls.append(attn)
        key, value = with_prefix(k, v, key, value)
        if kwargs.get("position_bias") is not None:  # T5: the prefix columns get no position bias
            kwargs["position_bias"] = F.pad(kwargs["position_bias"], (k.shape[-2], 0))
        return original(attn, query, key, value, pad_mask(mask, k.shape[-2]), *args, **kwargs)

    with eager(model):
        module.eager_attention_forward = attention
        try:
            yield
        finally:
            module.eager_attention_forward = original
    assert len(calls) == len(prefixes)


def deberta_attention(self, hidden_states, attention_mask, output_attentions=False, query_states=None, relative_pos=None,
                      rel_embeddings=None, prefix=None):
    """DeBERTa's DisentangledSelfAttention without relative attention, the prefix after the biases."""
    assert not self.relative_attention and query_states is None
    q, k, v = self.transpose_for_scores(self.in_proj(hidden_states)).chunk(3, dim=-1)
    q = q + self.transpose_for_scores(self.q_bias[None, None, :])
    v = v + self.transpose_for_scores(self.v_bias[None, None, :])
    k, v = with_prefix(*prefix, k, v)
    scores = (q / math.sqrt(q.shape[-1] * (1 + len(self.pos_att_type)))) @ k.transpose(-1, -2)
    probs = masked(scores, pad_mask(attention_mask.bool(), prefix[0].shape[-2])).softmax(-1)
    out = (probs @ v).permute(0, 2, 1, 3)
    return out.reshape(*out.shape[:2], -1), None


def bloom_attention(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                    output_attentions=False, prefix=None, **kwargs):
    """BLOOM's attention (ALiBi, interleaved fused q/k/v): the prefix keys get ALiBi bias 0."""
    b, s, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))  # (b, heads, s, d)
    k, v = with_prefix(*prefix, k, v)
    p = prefix[0].shape[-2]
    alibi = F.pad(alibi, (p, 0)).view(b, self.num_heads, 1, -1)
    scores = self.beta * alibi + self.inv_norm_factor * (q @ k.transpose(-1, -2))
    probs = F.softmax(masked(scores, pad_mask(attention_mask, p)), dim=-1, dtype=torch.float32).to(q.dtype)
    out = (probs @ v).permute(0, 2, 1, 3).reshape(b, s, -1)
    return self.dense(out) + residual, None


def falcon_attention(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, use_cache=False,
                     output_attentions=False, position_embeddings=None, prefix=None, **kwargs):
    """Falcon's rotary multi-query attention: the prefix (one key/value head) after the rotation."""
    assert alibi is None
    b, s, _ = hidden_states.shape
    q, k, v = (t.transpose(1, 2) for t in self._split_heads(self.query_key_value(hidden_states)))
    q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb(q, k, *position_embeddings)
    k, v = with_prefix(*prefix, k, v)
    scores = masked(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), pad_mask(attention_mask, prefix[0].shape[-2]))
    out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, s, -1)
    return self.dense(out), None


COPIED_ATTENTION = {"deberta": deberta_attention, "bloom": bloom_attention, "falcon": falcon_attention}


def attention_modules(model, arch: str) -> list:
    names = {"deberta": "DisentangledSelfAttention", "bloom": "BloomAttention", "falcon": "FalconAttention"}
    return [m for m in model.modules() if type(m).__name__ == names[arch]]


@contextlib.contextmanager
def prefix_in_copied_attention(model, arch: str, prefixes):
    """Each attention module's forward replaced by the copied one, holding its layer's prefix."""
    modules = attention_modules(model, arch)
    assert len(modules) == len(prefixes)
    for m, prefix in zip(modules, prefixes):
        m.forward = functools.partial(COPIED_ATTENTION[arch], m, prefix=prefix)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


PREFIX_ARCHS = ["t5-encoder", "distilbert", "deberta", "qwen2", "phi3", "bloom", "falcon", "gptj", "albert", "mistral"]


@pytest.mark.parametrize("flat", [False, True], ids=["mlp", "flat"])
@pytest.mark.parametrize("arch", PREFIX_ARCHS)
def test_prefix_tuning_matches_keys_and_values_prefixed_by_hand(arch, flat):
    model, gm = model_and_capture(arch)
    config = PrefixTuningConfig(prefix_length=3, bottleneck_size=8, flat=flat)
    gm.add_adapter("ref", config, set_active=True)
    try:
        randomise_(gm, "ref")
        att = gm._fx_attentions
        prefixes = prefixes_by_hand(adapter_weights(gm, "ref"), config, len(att), att[0].kv_heads, att[0].head_dim)
        # A model on transformers' attention interface is patched there (Falcon is from transformers 5.25 on).
        own = arch in COPIED_ATTENTION and not hasattr(sys.modules[type(model).__module__], "eager_attention_forward")
        patch = prefix_in_copied_attention(model, arch, prefixes) if own else prefix_in_eager_attention(model, prefixes)
        assert_matches(gm, model, inputs_for(model, seq=9), patch)
    finally:
        gm.delete_adapter("ref")


# -- LoRA ------------------------------------------------------------------------------------------


def fused_columns(model, arch: str, role: str) -> torch.Tensor:
    """The output columns of a fused q/k/v projection that hold ``role``."""
    c = model.config
    heads = c.num_attention_heads
    d = c.hidden_size // heads
    if arch == "falcon":  # multi-query: all query heads, then one key head and one value head
        assert c.multi_query and not c.new_decoder_architecture
        return {"q": torch.arange(c.hidden_size), "k": torch.arange(c.hidden_size, c.hidden_size + d),
                "v": torch.arange(c.hidden_size + d, c.hidden_size + 2 * d)}[role]
    # BLOOM's query_key_value and DeBERTa's in_proj: (heads, 3, head_dim), q / k / v interleaved per head
    return torch.arange(3 * c.hidden_size).view(heads, 3, d)[:, "qkv".index(role)].reshape(-1)


@contextlib.contextmanager
def lora_by_hooks(model, arch: str, w: dict, scaling: float):
    """``y + scaling * x A^T B^T`` on every projection with a LoRA, on its columns when fused. A
    shared projection (ALBERT) adds its one LoRA at every call."""
    deltas, modules = defaultdict(list), dict(model.named_modules())
    for key in (k for k in w if k.endswith(".lora_A")):
        path = key.removesuffix(".lora_A")
        a, b = w[key], w[f"{path}.lora_B"]
        parent, role = path.rsplit(".", 1)
        if path not in modules:  # <fused projection>.<q|k|v>
            deltas[parent].append((a, b, fused_columns(model, arch, role)))
        else:
            deltas[path].append((a, b, None))

    def hook(module, args, out, path):
        out = out.clone()
        for a, b, columns in deltas[path]:
            d = scaling * (args[0] @ a.T @ b.T)
            out = out + d if columns is None else out.index_add(-1, columns, d)
        return out

    handles = [model.get_submodule(p).register_forward_hook(functools.partial(hook, path=p)) for p in deltas]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


LORA = LoRAConfig(r=4, alpha=12, attn_matrices=["q", "k", "v", "o"], intermediate_lora=True, output_lora=True)


@pytest.mark.parametrize("arch", ["falcon", "bloom", "albert", "gptj", "mistral", "t5-encoder", "deberta"])
def test_lora_matches_w_x_plus_scaled_b_a_x(arch):
    model, gm = model_and_capture(arch)
    gm.add_adapter("ref", LORA, set_active=True)
    try:
        randomise_(gm, "ref", std=0.3)
        w = adapter_weights(gm, "ref")
        if arch == "albert":  # one LoRA per shared projection, not one per layer
            assert sum(k.endswith(".lora_A") for k in w) == 6
        assert_matches(gm, model, inputs_for(model, seq=9), lora_by_hooks(model, arch, w, LORA.alpha / LORA.r))
    finally:
        gm.delete_adapter("ref")


# -- bottleneck adapters ---------------------------------------------------------------------------

# Per architecture and location: the module whose output is the sublayer output h ("sub", where the
# adapter's weights live), the module whose first input is the residual r ("residual"), the norm
# applied to h + r (post-LN) or the module whose output is h + r (pre-LN, "sum"), and the embedding
# output the invertible adapter transforms. {i} is the layer; ALBERT's paths are shared by its layers.
PLACES = {
    "distilbert": dict(embedding="embeddings",
                       mh=dict(sub="transformer.layer.{i}.attention.out_lin", residual="transformer.layer.{i}", norm="transformer.layer.{i}.sa_layer_norm"),
                       output=dict(sub="transformer.layer.{i}.ffn.lin2", residual="transformer.layer.{i}.ffn", norm="transformer.layer.{i}.output_layer_norm")),
    "deberta": dict(embedding="embeddings",
                    mh=dict(sub="encoder.layer.{i}.attention.output.dense", residual="encoder.layer.{i}", norm="encoder.layer.{i}.attention.output.LayerNorm"),
                    output=dict(sub="encoder.layer.{i}.output.dense", residual="encoder.layer.{i}.intermediate", norm="encoder.layer.{i}.output.LayerNorm")),
    "albert": dict(embedding="encoder.embedding_hidden_mapping_in",
                   mh=dict(sub="encoder.albert_layer_groups.0.albert_layers.0.attention.dense", residual="encoder.albert_layer_groups.0.albert_layers.0",
                           norm="encoder.albert_layer_groups.0.albert_layers.0.attention.LayerNorm"),
                   output=dict(sub="encoder.albert_layer_groups.0.albert_layers.0.ffn_output", residual="encoder.albert_layer_groups.0.albert_layers.0.ffn",
                               norm="encoder.albert_layer_groups.0.albert_layers.0.full_layer_layer_norm")),
    "t5-encoder": dict(embedding="encoder.embed_tokens",
                       mh=dict(sub="encoder.block.{i}.layer.0.SelfAttention.o", residual="encoder.block.{i}.layer.0", sum="encoder.block.{i}.layer.0"),
                       output=dict(sub="encoder.block.{i}.layer.1.DenseReluDense.wo", residual="encoder.block.{i}.layer.1", sum="encoder.block.{i}.layer.1")),
    "bloom": dict(embedding="word_embeddings_layernorm",
                  mh=dict(sub="h.{i}.self_attention.dense", residual="h.{i}", sum="h.{i}.self_attention"),
                  output=dict(sub="h.{i}.mlp.dense_4h_to_h", residual="h.{i}.post_attention_layernorm", sum="h.{i}.mlp")),
    "gptj": dict(embedding="wte", parallel_residual=True,
                 mh=dict(sub="h.{i}.attn.out_proj", residual="h.{i}"), output=dict(sub="h.{i}.mlp.fc_out", residual="h.{i}")),
    "falcon": dict(embedding="word_embeddings", parallel_residual=True,
                   mh=dict(sub="h.{i}.self_attention.dense", residual="h.{i}"), output=dict(sub="h.{i}.mlp.dense_4h_to_h", residual="h.{i}")),
}
for _arch in ("qwen2", "phi3", "mistral"):  # pre-LN decoder layers
    PLACES[_arch] = dict(embedding="embed_tokens",
                         mh=dict(sub="layers.{i}.self_attn.o_proj", residual="layers.{i}.input_layernorm", sum=None),
                         output=dict(sub="layers.{i}.mlp.down_proj", residual="layers.{i}.post_attention_layernorm", sum="layers.{i}"))

ACTIVATIONS = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu, "tanh": torch.tanh}


def linear_or_phm(w: dict, prefix: str):
    """An adapter projection: ``nn.Linear`` weights, or Compacter's PHM layer
    ``x @ sum_i kron(rule_i, W_left_i @ W_right_i) + b``."""
    if f"{prefix}.weight" in w:
        return lambda x: F.linear(x, w[f"{prefix}.weight"], w[f"{prefix}.bias"])
    rule, weight = w["shared_parameters.phm_rule"], w[f"{prefix}.W_left"] @ w[f"{prefix}.W_right"]
    matrix = sum(torch.kron(rule[i], weight[i]) for i in range(rule.shape[0]))
    return lambda x: x @ matrix + w[f"{prefix}.b"]


def body_by_hand(w: dict, prefix: str, config):
    """The bottleneck body ``up(act(down(x))) * scaling``."""
    assert not (config.ln_before or config.ln_after or config.use_gating)
    down, up = linear_or_phm(w, f"{prefix}.adapter_down.0"), linear_or_phm(w, f"{prefix}.adapter_up")
    scaling = w[f"{prefix}.scaling"] if config.scaling == "learned" else float(config.scaling)
    return lambda x: up(ACTIVATIONS[config.non_linearity](down(x))) * scaling


def nice_by_hand(w: dict, x, config):
    """The NICE coupling block: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``, subnets with the adapter's
    non-linearity."""
    def subnet(name, t):
        t = ACTIVATIONS[config.non_linearity](F.linear(t, w[f"invertible_adapters.{name}.0.weight"], w[f"invertible_adapters.{name}.0.bias"]))
        return F.linear(t, w[f"invertible_adapters.{name}.2.weight"], w[f"invertible_adapters.{name}.2.bias"])
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    y1 = x1 + subnet("F", x2)
    return torch.cat([y1, x2 + subnet("G", y1)], -1)


def _first(t):
    return t[0] if isinstance(t, tuple) else t


def _replace_first(out, t):
    return (t, *out[1:]) if isinstance(out, tuple) else t


@contextlib.contextmanager
def bottleneck_by_hooks(model, arch: str, w: dict, config, layers: int = 2):
    """AdapterHub's placement rules as forward hooks on the eager model's modules."""
    places, handles = PLACES[arch], []

    def on(template: str, fn, pre: bool = False) -> None:
        """``fn(layer, tensor)`` hooked on the modules at ``template`` (their input when ``pre``); a
        module that several layers share (ALBERT) is in layer n at its n-th call."""
        modules = [model.get_submodule(template.format(i=i)) for i in range(layers)]
        shared, count = modules[0] is modules[-1], [0]

        def layer(module) -> int:
            if not shared:
                return next(i for i, m in enumerate(modules) if m is module)
            count[0] += 1
            return (count[0] - 1) % layers

        for m in {id(m): m for m in modules}.values():
            if pre:
                handles.append(m.register_forward_pre_hook(
                    lambda mod, args, kwargs: fn(layer(mod), args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
            else:
                handles.append(m.register_forward_hook(lambda mod, args, out: fn(layer(mod), out)))

    for location in ("mh", "output"):
        if not getattr(config, f"{location}_adapter"):
            continue
        place, residual, summed = places[location], {}, {}

        def body(i, place=place):
            sub = place["sub"].format(i=i)
            return body_by_hand(w, sub if "{i}" in place["sub"] else f"{sub}.layer{i}", config)

        on(place["residual"], residual.__setitem__, pre=True)
        if config.is_parallel:  # LN(A(r) + h + r): the adapter reads the residual
            on(place["sub"], lambda i, h, body=body, residual=residual: h + body(i)(residual[i]))
        elif not config.original_ln_before or places.get("parallel_residual"):  # LN(A(h) + h + r)
            on(place["sub"], lambda i, h, body=body: h + body(i)(h))
        elif "norm" in place:  # post-LN Pfeiffer: LN(A(LN(z)) + z), the norm's forward without its hooks
            on(place["norm"], summed.__setitem__, pre=True)
            on(place["norm"], lambda i, out, body=body, place=place, summed=summed:
               model.get_submodule(place["norm"].format(i=i)).forward(body(i)(out) + summed[i]))
        else:  # pre-LN Pfeiffer: A(z) + z, z = h + r
            assert place["sum"] is not None, f"{arch} has no {location} sum to hook"
            on(place["sum"], lambda i, out, body=body: _replace_first(out, _first(out) + body(i)(_first(out))))
    if config.inv_adapter:
        on(places["embedding"], lambda i, out: nice_by_hand(w, out, config))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


BOTTLENECK_ARCHS = ["distilbert", "deberta", "t5-encoder", "qwen2", "phi3", "bloom", "gptj", "falcon", "albert", "mistral"]
BOTTLENECKS = {"houlsby+inv": "houlsby+inv", "pfeiffer": "pfeiffer", "scaled_parallel": "scaled_parallel",
               "compacter++": CompacterPlusPlusConfig(reduction_factor=8)}


@pytest.mark.parametrize("method", list(BOTTLENECKS))
@pytest.mark.parametrize("arch", BOTTLENECK_ARCHS)
def test_bottleneck_matches_adapterhub_placement_by_hooks(arch, method):
    model, gm = model_and_capture(arch)
    gm.add_adapter("ref", BOTTLENECKS[method], set_active=True)
    try:
        randomise_(gm, "ref", std=0.3)
        config = gm.adapters["ref"]
        patch = bottleneck_by_hooks(model, arch, adapter_weights(gm, "ref"), config)
        assert_matches(gm, model, inputs_for(model, seq=9), patch)
    finally:
        gm.delete_adapter("ref")
