"""torch.compile: every method in fxadapt.CONFIGS compiles whole (fullgraph, no graph break) on BERT
and Llama, in training and in eval, with the eager outputs; adapter changes on a compiled module
take effect (AdaptedModule recompiles its code on every change, so dynamo sees a new frame)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fxadapt
from conftest import ONE_LAYER, assert_inductor_step_matches_eager, inputs_for

ARCHS = list(ONE_LAYER)


@functools.lru_cache(maxsize=None)
def captured(arch: str):
    """(model, capture) of a one-layer model; tests delete the adapters they add."""
    torch.manual_seed(0)
    model = ONE_LAYER[arch]().eval()
    return model, fxadapt.capture(model)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # The forward pre-hook is compiled as its own small frame, shared by every AdaptedModule; start each
    # test from empty caches so that tests do not use up dynamo's recompile limit for it together.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _with_adapter(arch: str, config_id: str):
    """The cached capture of ``arch`` with adapter ``x`` (perturbed, so it acts) active; remove it after."""
    model, gm = captured(arch)
    try:
        gm.add_adapter("x", config_id, set_active=True)
    except (fxadapt.SiteError, fxadapt.ConfigError) as e:  # the method does not fit the tiny model
        pytest.skip(f"{config_id} on tiny {arch}: {e}")
    with torch.no_grad():
        for i, p in enumerate(gm.adapter_state_dict("x").values()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return model, gm


def _bound(gm, model, **kw) -> dict:
    """Every graph input, so the forward pre-hook has nothing to fill in."""
    return gm._fx_inputs.bind(type(model).__name__, (), inputs_for(model, **kw))


@pytest.mark.parametrize("config_id", sorted(fxadapt.CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
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
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert counter.frame_count == 2  # one graph per (mode, grad mode): nothing split, nothing else compiled
    finally:
        gm.delete_adapter("x")
        gm.eval()


def test_partial_inputs_compile_with_the_call_binding():
    """The forward pre-hook that fills omitted inputs (token_type_ids) compiles too, without a break."""
    model, gm = _with_adapter("bert", "lora")
    try:
        inputs = inputs_for(model)
        assert set(inputs) < set(gm._fx_inputs.names)
        with torch.no_grad():
            got = torch.compile(gm, fullgraph=True, backend="aot_eager")(**inputs)[0]
            torch.testing.assert_close(got, gm(**inputs)[0], rtol=1e-5, atol=1e-5)
    finally:
        gm.delete_adapter("x")


def test_adapter_changes_on_a_compiled_module_are_never_stale():
    """Compile, call, change the adapters, call the compiled module again: it computes the new state."""
    model, gm = captured("bert")
    inputs = _bound(gm, model)
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")

    def check() -> torch.Tensor:
        with torch.no_grad():
            expected, got = gm(**inputs)[0], compiled(**inputs)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        return got

    outputs = [check()]
    try:
        gm.add_adapter("a", fxadapt.LoRAConfig(init_weights="bert"), set_active=True)
        outputs.append(check())
        gm.add_adapter("b", fxadapt.IA3Config(init_weights="bert"))
        gm.set_active_adapters(["a", "b"])
        outputs.append(check())
        gm.merge_adapter("a")
        torch.testing.assert_close(check(), outputs[-1], rtol=1e-4, atol=1e-4)  # merged computes the same
        gm.set_active_adapters(["a"])
        torch.testing.assert_close(check(), outputs[1], rtol=1e-4, atol=1e-4)
        gm.reset_adapter()
        gm.set_active_adapters(None)
        torch.testing.assert_close(check(), outputs[0], rtol=0, atol=0)
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
@pytest.mark.parametrize("arch, config_id", [("bert", "lora"), ("llama", "ia3")])
def test_inductor_training_step_matches_eager(arch, config_id):
    """Inductor (the real compiler) on a training step: same outputs and adapter gradients as eager."""
    model, gm = _with_adapter(arch, config_id)
    try:
        gm.train_adapter("x")
        assert_inductor_step_matches_eager(gm, _bound(gm, model), rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-5)
    finally:
        gm.delete_adapter("x")
        for p in gm.parameters():
            p.requires_grad_(True)
        gm.eval()
