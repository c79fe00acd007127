"""torch.compile: every method compiles whole (fullgraph, no graph break) on BERT and Llama, in training
and in eval, with the eager outputs; adapter changes on a compiled module take effect (AdaptedModule
recompiles its code on every change, so dynamo sees a new frame); inductor's training step matches eager.

On BERT, the configs that between them insert every kind of node (conftest.COVERING: aliases and configs
whose nodes another one holds are not compiled again), at sizes valid for hidden 32; on Llama, whose sites
differ (gated FFN, grouped-query attention, RoPE) but whose inserted nodes are the same, five of them."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fxadapt
from conftest import COVERING, ONE_LAYER, assert_inductor_step_matches_eager, distinct_configs, inputs_for, perturb_
from conftest import captured_one_layer as captured
from fxadapt.testing import assert_outputs_close, rounding_tolerance

CONFIGS = distinct_configs()
LLAMA = ["houlsby+inv", "compacter", "mam", "unipelt", "ia3"]  # bottleneck + invertible, PHM, prefix + parallel, gates + LoRA, (IA)^3
CASES = [("bert", c) for c in COVERING] + [("llama", c) for c in LLAMA]
RTOL = rounding_tolerance(torch.float32, 64)  # one layer: the same ops, perhaps another summation order
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _with_adapter(arch: str, config_id: str):
    """The cached capture of ``arch`` with adapter ``x`` (perturbed, so it acts) active; remove it after."""
    model, gm = captured(arch)
    torch.manual_seed(0)  # the adapter's initial weights: the same whatever ran before
    gm.add_adapter("x", CONFIGS[config_id], set_active=True)
    perturb_(gm.adapter_state_dict("x").values())
    return model, gm


def _bound(gm, model, **kw) -> dict:
    """Every graph input, so the forward pre-hook has nothing to fill in."""
    return gm._fx_inputs.bind(type(model).__name__, (), inputs_for(model, **kw))


@pytest.mark.parametrize("arch, config_id", CASES)
def test_compiles_whole_in_train_and_eval_with_eager_outputs(arch, config_id):
    model, gm = _with_adapter(arch, config_id)
    try:
        inputs = _bound(gm, model)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(gm, fullgraph=True, backend=counter)  # a graph break raises
        for training in (True, False):
            gm.train(training)
            with torch.set_grad_enabled(training):
                torch.manual_seed(0)
                expected = gm(**inputs)[0]
                torch.manual_seed(0)
                got = compiled(**inputs)[0]
            assert_outputs_close(got, expected, rtol=RTOL)
        assert counter.frame_count == 2  # one graph per (mode, grad mode): nothing split, nothing else compiled
    finally:
        gm.delete_adapter("x")
        gm.eval()


def test_partial_inputs_compile_with_the_call_binding():
    """The forward pre-hook that fills omitted inputs (token_type_ids) compiles too, without a break,
    on its first call (a fresh capture: nothing the hook caches has been computed eagerly yet)."""
    torch.manual_seed(0)
    model = ONE_LAYER["bert"]().eval()
    gm = fxadapt.rewrite(model, CONFIGS["lora"])
    perturb_(gm.adapter_state_dict("lora").values())
    inputs = inputs_for(model)
    assert set(inputs) < set(gm._fx_inputs.names)
    with torch.no_grad():
        got = torch.compile(gm, fullgraph=True, backend="aot_eager")(**inputs)[0]
        assert_outputs_close(got, gm(**inputs)[0], rtol=RTOL)


def test_adapter_changes_on_a_compiled_module_are_never_stale():
    """Compile, call, change the adapters, call the compiled module again: it computes the new state."""
    model, gm = captured("bert")
    inputs = _bound(gm, model)
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")

    def check() -> torch.Tensor:
        with torch.no_grad():
            expected, got = gm(**inputs)[0], compiled(**inputs)[0]
        assert_outputs_close(got, expected, rtol=RTOL)
        return got

    outputs = [check()]
    try:
        gm.add_adapter("a", fxadapt.LoRAConfig(init_weights="bert"), set_active=True)
        outputs.append(check())
        gm.add_adapter("b", fxadapt.IA3Config(init_weights="bert"))
        gm.set_active_adapters(["a", "b"])
        outputs.append(check())
        gm.merge_adapter("a")
        assert_outputs_close(check(), outputs[-1], rtol=RTOL)  # merged computes the same, up to rounding
        gm.set_active_adapters(["a"])
        assert_outputs_close(check(), outputs[1], rtol=RTOL)
        gm.reset_adapter()
        gm.set_active_adapters(None)
        assert_outputs_close(check(), outputs[0], rtol=0, atol=0)
        # Each state computed something else, so a stale compiled graph would have been caught.
        assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    finally:
        for name in list(gm.adapters):
            gm.delete_adapter(name)


def test_every_rebuild_gives_dynamo_a_new_code_object():
    """Why staleness cannot happen: dynamo caches compiled code per code object, and every adapter
    change regenerates the module's forward (a new code object), so the next call compiles afresh."""
    _, gm = captured("llama")
    before = type(gm).forward.__code__
    gm.add_adapter("a", "lora", set_active=True)
    try:
        assert type(gm).forward.__code__ is not before
    finally:
        gm.delete_adapter("a")


@pytest.mark.slow
def test_inductor_training_step_matches_eager():
    """Inductor (the real compiler, one compilation: ~20 s per graph here) on a training step of Llama
    with LoRA and (IA)^3 active together: same outputs and adapter gradients as eager."""
    model, gm = _with_adapter("llama", "lora")
    gm.add_adapter("y", CONFIGS["ia3"], set_active=True)
    perturb_(gm.adapter_state_dict("y").values(), seed=1)
    try:
        gm.set_active_adapters(["x", "y"])
        gm.train_adapter(["x", "y"])
        # inductor fuses and reorders sums; gradients go through one more reduction (over batch and sequence)
        assert_inductor_step_matches_eager(gm, _bound(gm, model), rtol=RTOL, grad_rtol=rounding_tolerance(torch.float32, 64 * 33, depth=2))
    finally:
        gm.delete_adapter("x")
        gm.delete_adapter("y")
        for p in gm.parameters():
            p.requires_grad_(True)
        gm.eval()
