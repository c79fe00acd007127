"""Tiny random models of every architecture fxadapt is tested on, built from configs (no download)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import pytest
import torch
import transformers as T
from hypothesis import HealthCheck, settings

import fxadapt

logging.getLogger("transformers").setLevel(logging.ERROR)
T.logging.set_verbosity_error()

settings.register_profile("default", max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

H = 32
_ENCODER = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100, max_position_embeddings=64)
_DECODER = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                vocab_size=100, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)

BUILDERS = {
    "bert": lambda: T.BertModel(T.BertConfig(**_ENCODER)),
    "roberta": lambda: T.RobertaModel(T.RobertaConfig(**_ENCODER)),
    "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=H, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)),
    "deberta": lambda: T.DebertaModel(T.DebertaConfig(**_ENCODER)),
    "deberta-v2": lambda: T.DebertaV2Model(T.DebertaV2Config(
        **_ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=32, position_biased_input=False)),
    "vit": lambda: T.ViTModel(T.ViTConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)),
    "gpt2": lambda: T.GPT2Model(T.GPT2Config(n_embd=H, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=1, eos_token_id=2)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER)),
    "qwen2": lambda: T.Qwen2Model(T.Qwen2Config(**_DECODER)),
    "t5-encoder": lambda: T.T5EncoderModel(T.T5Config(d_model=H, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100, decoder_start_token_id=0)),
    "phi3": lambda: T.Phi3Model(T.Phi3Config(**{**_DECODER, "num_key_value_heads": 4})),
}
ARCHS = list(BUILDERS)
# One layer, for compilations: dynamo's time grows with the graph, and one layer has every kind of site.
ONE_LAYER = {
    "bert": lambda: T.BertModel(T.BertConfig(**{**_ENCODER, "num_hidden_layers": 1})),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**{**_DECODER, "num_hidden_layers": 1})),
}


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model, the same for the same seed, in eval mode."""
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


def inputs_for(model: torch.nn.Module, batch: int = 3, seq: int = 11, pad: bool = True, seed: int = 1) -> dict:
    """Inputs of a shape other than the capture's, with padding on the first row."""
    g = torch.Generator().manual_seed(seed)
    if model.main_input_name == "pixel_values":
        size = model.config.image_size
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, seq - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def reference(model: torch.nn.Module, inputs: dict):
    """The model's own output for these inputs, as captured: decoders without a KV cache."""
    extra = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
    with torch.no_grad():
        return model(**inputs, **extra)


def first_tensor(output) -> torch.Tensor:
    return output[0] if not isinstance(output, torch.Tensor) else output


def masked(output, inputs: dict) -> torch.Tensor:
    """The main output with padded positions zeroed (they may differ between implementations)."""
    out = first_tensor(output)
    mask = inputs.get("attention_mask")
    if mask is None or out.ndim < 3 or out.shape[:2] != mask.shape:
        return out
    return out * mask[..., None].to(out.dtype)


@functools.lru_cache(maxsize=None)
def _captured(arch: str):
    model = build(arch)
    return model, fxadapt.capture(model)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def captured(arch: str):
    """(model, capture) for an architecture, captured once per test session. Tests that add adapters
    must delete them again; use ``fresh_capture`` when a test changes more than that."""
    return _captured(arch)


def perturb_(weights, std: float = 0.1, seed: int = 0) -> None:
    """Move adapter weights (a module's parameters, or the tensors given) away from their initial
    values, reproducibly, on whatever device they are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in weights.parameters() if isinstance(weights, torch.nn.Module) else weights:
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * std)


@contextlib.contextmanager
def restored(gm, *names: str):
    """Give a shared capture back as it was: these adapters deleted, every parameter trainable
    with no gradient, eval mode."""
    try:
        yield gm
    finally:
        for name in names:
            if name in gm.adapters:
                gm.delete_adapter(name)
        for p in gm.parameters():
            p.requires_grad_(True)
            p.grad = None
        gm.eval()


def assert_inductor_step_matches_eager(gm, inputs: dict, *, rtol: float, atol: float, grad_rtol: float, grad_atol: float) -> None:
    """One step of ``gm`` compiled whole with inductor against eager: same main output and same
    gradients of the parameters that require them (dropout draws as eager does)."""
    params = [p for p in gm.parameters() if p.requires_grad]

    def step(module):
        torch.manual_seed(0)
        out = module(**inputs)[0]
        return out, torch.autograd.grad(out.float().pow(2).mean(), params)

    with torch._inductor.config.patch(fallback_random=True):
        got, got_grads = step(torch.compile(gm, fullgraph=True))
    expected, expected_grads = step(gm)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=grad_rtol, atol=grad_atol)
