"""Activation checkpointing per layer (gm.gradient_checkpointing_enable): the oracle is the same module
without it. With dropout acting and the same seed before each step, loss and gradients (adapters and
trainable base weights) equal the plain step's; the layers are really recomputed (without the saved
RNG state the gradients change); one checkpoint per layer, none in eval mode or under no_grad; the
regions survive adapter changes; torch.compile(fullgraph=True) takes the graph; disabling gives the
plain graph back; a step keeps fewer tensors alive at once (benchmarks/memory.py measures how many)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers as T

import fxadapt
from conftest import _DECODER, _ENCODER, inputs_for, perturb_
from fxadapt.errors import ConfigError
from fxadapt.passes import checkpointing
from fxadapt.testing import relative_error

# The checkpointed step recomputes the same ops on the same inputs with the same dropout masks: the
# results are the plain step's up to summation order at most.
RTOL = 1e-6
# Different dropout masks change a loss or gradient by far more than that.
CHANGED = 1e-3

# Tiny models with every dropout acting in training mode (BERT's default 0.1; Llama's attention dropout).
MODELS = {
    "bert": lambda: T.BertModel(T.BertConfig(**_ENCODER)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER, attention_dropout=0.1)),
}


def _adapted(arch: str):
    """The model with LoRA (dropout 0.1) and a Houlsby bottleneck pair in every layer, both moved off
    their initial (zero) updates; adapters and the base `o` projections trainable, training mode."""
    torch.manual_seed(0)
    model = MODELS[arch]().eval()
    gm = fxadapt.capture(model)
    gm.add_adapter("lora", fxadapt.LoRAConfig(r=4, alpha=8, dropout=0.1))
    gm.add_adapter("bn", "houlsby")
    gm.train_adapter(["lora", "bn"], also=[s.path for s in gm.sites() if s.role == "o"])
    perturb_([p for name in ("lora", "bn") for p in gm.adapter_state_dict(name).values()])
    return model, gm


def _regions(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == checkpointing.CHECKPOINT_MODULE)


def _step(gm, inputs: dict, seed: int = 0, module=None):
    """Loss and gradients of one training step, the dropout masks drawn from ``seed``."""
    for p in gm.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = (gm if module is None else module)(**inputs)[0]
    # A fixed random projection: a loss the output's normalisation cannot make constant.
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    loss = (out * weights).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}


def _worst(got: dict, expected: dict) -> float:
    assert got.keys() == expected.keys()
    return max(relative_error(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("arch", list(MODELS))
def test_loss_and_gradients_equal_the_plain_step(arch):
    model, gm = _adapted(arch)
    inputs = inputs_for(model)
    loss, grads = _step(gm, inputs)
    assert any(".loras." in k for k in grads) and any(".adapters." in k for k in grads) and any(".o_proj." in k or ".output.dense." in k for k in grads)
    assert grads.keys() == {n for n, p in gm.named_parameters() if p.requires_grad}
    assert all(g.abs().max() > 0 for g in grads.values())
    other_loss, _ = _step(gm, inputs, seed=1)
    assert relative_error(other_loss, loss) > CHANGED  # dropout acts: same masks are something to get right

    gm.gradient_checkpointing_enable()
    assert gm.is_gradient_checkpointing and _regions(gm) == model.config.num_hidden_layers
    ck_loss, ck_grads = _step(gm, inputs)
    assert relative_error(ck_loss, loss) <= RTOL
    assert _worst(ck_grads, grads) <= RTOL

    # The backward pass really recomputes the layers: without the saved RNG state it draws other masks.
    gm.gradient_checkpointing_enable({"preserve_rng_state": False})
    fresh_loss, fresh_grads = _step(gm, inputs)
    assert relative_error(fresh_loss, loss) <= RTOL
    assert _worst(fresh_grads, grads) > CHANGED


def test_one_region_per_layer_run_under_checkpoint_only_for_training(monkeypatch):
    model, gm = _adapted("llama")
    inputs = inputs_for(model)
    gm.gradient_checkpointing_enable()
    # Every projection, and the adapters inside the layers, moved into the regions' bodies.
    outer = {n.name for n in gm.graph.nodes}
    inner = {n.name: n for body in gm.fxadapt_checkpoint.bodies for n in body.graph.nodes}
    for site in gm.sites():
        assert not set(site.linear.nodes) & outer and set(site.linear.nodes) <= set(inner), site
    adapters = {n.target for n in inner.values() if n.op == "call_module"}
    assert adapters == {p.module for p in gm._fx_adapters["bn"].placements}
    assert sum(1 for n in inner.values() if n.op == "call_function" and "dropout" in str(n.target)) >= 2 * model.config.num_hidden_layers

    calls = []
    monkeypatch.setattr(checkpointing, "checkpoint", lambda fn, *args, **kwargs: calls.append(kwargs) or fn(*args))
    gm(**inputs)
    assert calls == [{"use_reentrant": False, "preserve_rng_state": True}] * model.config.num_hidden_layers
    calls.clear()
    with torch.no_grad():
        gm(**inputs)
    gm.eval()
    checkpointed_eval = gm(**inputs)[0]
    assert calls == []  # no checkpoint overhead where nothing is saved for a backward
    gm.gradient_checkpointing_disable()
    assert relative_error(checkpointed_eval, gm(**inputs)[0]) <= RTOL


def test_regions_survive_adapter_changes_and_disable_restores_the_plain_graph():
    model, gm = _adapted("bert")
    inputs = inputs_for(model)
    layers = model.config.num_hidden_layers
    plain_code, keys = gm.code, list(gm.state_dict())
    gm.gradient_checkpointing_enable()
    assert list(gm.state_dict()) == keys and len(list(gm.parameters())) == len(dict(gm.named_parameters()))

    gm.add_adapter("ia3", "ia3", set_active=False)
    gm.set_active_adapters(["lora", "ia3"])
    assert _regions(gm) == layers and gm.is_gradient_checkpointing
    gm.merge_adapter("lora")
    assert _regions(gm) == layers
    gm.train()
    loss, grads = _step(gm, inputs)
    gm.gradient_checkpointing_disable()
    plain_loss, plain_grads = _step(gm, inputs)
    assert relative_error(loss, plain_loss) <= RTOL and _worst(grads, plain_grads) <= RTOL
    gm.reset_adapter("lora")
    gm.delete_adapter("ia3")
    gm.set_active_adapters(["lora", "bn"])

    assert not gm.is_gradient_checkpointing and _regions(gm) == 0
    assert checkpointing.CHECKPOINT_MODULE not in dict(gm.named_modules())
    assert gm.code == plain_code and list(gm.state_dict()) == keys


def test_every_n_layers_and_bad_arguments():
    model, gm = _adapted("bert")
    code = gm.code
    bad = [({"activation_checkpointing_kwargs": {"use_reentrant": False, "recompute": True}}, "recompute"),
           ({"activation_checkpointing_kwargs": ["use_reentrant"]}, "activation_checkpointing_kwargs"),
           ({"every_n_layers": 0}, "every_n_layers"), ({"every_n_layers": 1.0}, "every_n_layers"), ({"offload": "yes"}, "offload")]
    for kwargs, field in bad:
        with pytest.raises(ConfigError) as e:
            gm.activation_checkpointing_enable(**kwargs)
        assert e.value.field == field
    with pytest.raises(ConfigError) as e:
        gm.gradient_checkpointing_enable(gradient_checkpointing_kwargs="use_reentrant")
    assert e.value.field == "gradient_checkpointing_kwargs"
    assert not gm.is_activation_checkpointing and gm.code == code

    gm.activation_checkpointing_enable(every_n_layers=2)  # layers 0, 2, ...: one of two
    assert _regions(gm) == 1 and gm.is_gradient_checkpointing
    gm.gradient_checkpointing_disable()
    assert not gm.is_activation_checkpointing and gm.code == code


def test_trainer_turns_it_on(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = MODELS["llama"]().eval()
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    gm = fxadapt.capture(model, example_kwargs={"input_ids": ids, "labels": ids})  # the model's own loss, for Trainer
    gm.add_adapter("lora", "lora")
    gm.train_adapter("lora")
    calls = []
    monkeypatch.setattr(checkpointing, "checkpoint", lambda fn, *args, **kwargs: calls.append(kwargs) or fn(*args))
    args = T.TrainingArguments(output_dir=str(tmp_path), activation_checkpointing=True, max_steps=1, per_device_train_batch_size=2,
                               report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    T.Trainer(model=gm, args=args, train_dataset=[{"input_ids": row, "labels": row} for row in ids]).train()
    assert gm.is_activation_checkpointing and len(calls) == model.config.num_hidden_layers


def test_compiled_fullgraph_step_equals_the_plain_eager_step(fresh_dynamo):
    model, gm = _adapted("llama")
    inputs = inputs_for(model)
    loss, grads = _step(gm, inputs)
    gm.gradient_checkpointing_enable()
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    ck_loss, ck_grads = _step(gm, inputs, module=compiled)
    assert relative_error(ck_loss, loss) <= RTOL
    assert _worst(ck_grads, grads) <= RTOL


def test_a_checkpointed_step_keeps_fewer_tensors_alive():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("fxadapt_memory_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    peaks, losses = {}, {}
    for mode in ("off", "on"):
        args = argparse.Namespace(layers=2, seq=64, batch=1, hidden=64, intermediate=172, heads=4, device="cpu", child=mode)
        gm, step, seen = bench.build(args)
        step()  # gradients exist before the measured step
        with bench.LiveTensors() as tracker:
            step()
        peaks[mode], losses[mode] = tracker.peak, seen[-1]
        assert _regions(gm) == (2 if mode == "on" else 0)
    assert losses["on"] == losses["off"]
    assert peaks["on"] < peaks["off"]
