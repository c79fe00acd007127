"""Tiny random models of every architecture fxadapt is tested on, built from configs (no download)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from pathlib import Path

import pytest
import torch
import transformers as T
from hypothesis import HealthCheck, settings
from safetensors.torch import load_file

import fxadapt
from fxadapt.testing import rounding_tolerance

logging.getLogger("transformers").setLevel(logging.ERROR)
T.logging.set_verbosity_error()

settings.register_profile("default", max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# FXADAPT_FLUSH_DENORMAL=1 runs the suite with denormals flushed to zero, as some CPUs and BLAS do: a
# tolerance that leans on tiny values shows up there.
if os.environ.get("FXADAPT_FLUSH_DENORMAL") == "1" and not torch.set_flush_denormal(True):
    raise RuntimeError("FXADAPT_FLUSH_DENORMAL=1, but this CPU cannot flush denormals")

# Under pytest-xdist (README's test command runs two workers, one per core) each worker computes on one
# thread: the tiny models of these tests gain nothing from a second thread, and two workers with two
# threads each would contend for the cores.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# The files that run longest (measured with --durations=0 on two workers), first: README's
# command hands whole files to the two workers in collection order (--dist loadfile
# --no-loadscope-reorder), so a long file taken up last would end the run on one worker alone.
LONGEST_FIRST = ["test_generation.py", "test_benchmarks.py", "test_compile.py", "test_checkpoint.py", "test_module.py",
                 "test_examples.py", "test_export.py", "test_cli.py", "test_architecture_classes.py", "test_loha_lokr.py",
                 "test_decoder_heads.py", "test_fuse.py", "test_references.py", "test_encoder_decoder.py", "test_training.py",
                 "test_gradient_checkpointing.py", "test_moe.py", "test_generation_routing.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


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


def distinct_configs() -> dict:
    """``fxadapt.CONFIGS`` with one id per distinct config (aliases such as ``seq_bn`` = ``pfeiffer``
    dropped: the first id of each), at sizes valid for these models' hidden size: Compacter's reduction
    factor 32 leaves a bottleneck of 32 / 32 = 1, which its phm_dim=4 cannot divide, so it gets 4
    (a bottleneck of 8)."""
    out = {}
    for cid, config in fxadapt.CONFIGS.items():
        if config in out.values():
            continue
        if getattr(config, "phm_layer", False):
            config = dataclasses.replace(config, reduction_factor=4)
        out[cid] = config
    return out


# The configs that between them insert every kind of node fxadapt has, for compilations and exports
# (each costs seconds): pfeiffer+inv and houlsby+inv hold pfeiffer's and houlsby's bottlenecks (LayerNorm
# before and after) plus the invertible adapter; mam is parallel (scaling 4.0) with prefix_tuning (its MLP);
# scaled_parallel adds a learned scaling; unipelt the gates.
COVERING = ["pfeiffer+inv", "houlsby+inv", "scaled_parallel", "compacter", "compacter++", "prefix_tuning_flat", "mam", "unipelt",
            "lora", "ia3"]


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


@pytest.fixture
def fresh_dynamo():
    """Empty dynamo caches before and after the test. The forward pre-hook is compiled as its own small
    frame, shared by every AdaptedModule: tests that compile start afresh so that together they do
    not use up dynamo's recompile limit for it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def captured(arch: str):
    """(model, capture) for an architecture, captured once per test session. Tests that add adapters
    must delete them again; use ``fresh_capture`` when a test changes more than that."""
    return _captured(arch)


@functools.lru_cache(maxsize=None)
def captured_one_layer(arch: str):
    """(model, capture) of the one-layer model of ``arch`` (``ONE_LAYER``), captured once per test
    session, for compilations and exports; tests delete the adapters they add."""
    torch.manual_seed(0)
    model = ONE_LAYER[arch]().eval()
    return model, fxadapt.capture(model)


def perturb_(weights, std: float = 0.1, seed: int = 0) -> None:
    """Move adapter weights (a module's parameters, or the tensors given) away from their initial
    values, reproducibly, on whatever device they are. Raises when it would change nothing (no
    tensor, or ``std`` not positive): a test that perturbs must perturb."""
    if not std > 0:
        raise ValueError(f"perturb_ needs std > 0, got {std}")
    tensors = list(weights.parameters() if isinstance(weights, torch.nn.Module) else weights)
    if not tensors:
        raise ValueError("perturb_ was given no tensor")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tensors:
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


def assert_inductor_step_matches_eager(gm, inputs: dict, *, rtol: float, grad_rtol: float, backend: str = "inductor") -> None:
    """One step of ``gm`` compiled whole with inductor (or ``backend``: "aot_eager" checks the whole
    graph and its backward without inductor's code generation) against eager: same main output and
    same gradients of the parameters that require them (dropout draws as eager does), each within its
    relative tolerance of the eager values' magnitude."""
    from fxadapt.testing import assert_outputs_close

    params = [p for p in gm.parameters() if p.requires_grad]
    assert params, "nothing to train: the step would compare no gradient"

    def step(module):
        torch.manual_seed(0)
        out = module(**inputs)[0]
        # A fixed random projection: a loss the output's normalisation cannot make constant (the mean
        # square of a LayerNorm output is 1, whose gradients are rounding noise).
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device)
        return out, torch.autograd.grad((out.float() * weights).mean(), params)

    with torch._inductor.config.patch(fallback_random=True):
        got, got_grads = step(torch.compile(gm, fullgraph=True, backend=backend))
    expected, expected_grads = step(gm)
    assert_outputs_close(got.detach(), expected.detach(), rtol=rtol)
    for g, e in zip(got_grads, expected_grads):
        assert e.abs().max() > 0  # a gradient that reaches the parameter
        assert_outputs_close(g, e, rtol=grad_rtol)


def copy_peft_lora(theirs, gm) -> int:
    """Copy the LoRA factors of every adapter of PEFT model ``theirs`` into ``gm``'s LoRA adapter of
    the same name. Returns how many tensors were copied."""
    copied = 0
    with torch.no_grad():
        for key, p in theirs.named_parameters():
            if ".lora_" in key:
                path, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
                which, adapter, _ = rest.split(".")
                gm.adapter_state_dict(adapter)[f"{path}.lora_{which}"].copy_(p)
                copied += 1
    return copied


def assert_lora_matches_peft(model, inputs: dict, gm, config, targets: list[str], rtol: float) -> None:
    """Add ``config`` (a LoRA on exactly ``targets``) to ``gm``, copy the weights of PEFT's LoRA on the
    same modules (random, ``init_lora_weights=False``) into it, and compare the first outputs; the
    adapter is deleted again. Also checks that LoRA moves the output well beyond ``rtol``."""
    import copy

    import peft

    from fxadapt.testing import assert_outputs_close, relative_error

    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=targets,
                                                                      init_lora_weights=False)).eval()
    gm.add_adapter("lora", config, set_active=True)
    try:
        state = gm.adapter_state_dict("lora")
        copied = 0
        with torch.no_grad():
            for key, p in theirs.named_parameters():
                if "lora_" in key:
                    path, _, param = key.removeprefix("base_model.model.").partition(".lora_")
                    state[f"{path}.lora_{param.split('.')[0]}"].copy_(p)
                    copied += 1
            assert copied == len(state) == 2 * len(targets)
            got, expected, base = gm(**inputs)[0], theirs(**inputs)[0], model(**inputs)[0]
        assert relative_error(base, expected) > 100 * rtol, "LoRA hardly changes the output"
        assert_outputs_close(got, expected, rtol=rtol)
    finally:
        gm.delete_adapter("lora")


# -- AdapterHub fixtures with several adapters (compositions, fusions) --------------------------

HUB = Path(__file__).parent / "fixtures" / "adapterhub"
# AdapterHub ran on transformers 4.57 (another graph, another summation order): float32 rounding over the
# hidden width, through two layers.
HUB_RTOL = rounding_tolerance(torch.float32, 128, depth=2)
_HUB_BASES: dict = {}


def hub_base(model_dir: str):
    """A fixture's base model (transformers 5) captured, once per process; tests delete what they add."""
    if model_dir not in _HUB_BASES:
        _HUB_BASES[model_dir] = fxadapt.capture(T.AutoModel.from_pretrained(HUB / model_dir / "base").eval())
    return _HUB_BASES[model_dir]


def hub_io(fixture: str) -> dict:
    """A fixture's inputs and AdapterHub's outputs."""
    return load_file(HUB / fixture / "io.safetensors")


@pytest.fixture
def hub_clean():
    """Delete every adapter and fusion a test added to the shared captures of :func:`hub_base`."""
    yield
    for gm in _HUB_BASES.values():
        gm.set_active_adapters(None)
        for name in list(gm.adapter_fusions):
            gm.delete_adapter_fusion(name)
        for name in list(gm.adapters):
            gm.delete_adapter(name)
        gm.eval()
