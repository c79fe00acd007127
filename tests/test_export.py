"""Export: torch.export of adapted and merged modules with dynamic batch and sequence, .pt2 save/load,
fxadapt.export to .pt2 and .onnx (onnxruntime reproduces the outputs), eval-mode semantics."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fxadapt
from conftest import COVERING, build, captured, captured_one_layer, distinct_configs, inputs_for, perturb_, reference
from fxadapt.export import export_program
from fxadapt.testing import assert_outputs_close, rounding_tolerance

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
CONFIGS = distinct_configs()  # Compacter at a size valid for hidden 32
RTOL = rounding_tolerance(torch.float32, 64, depth=2)  # the same ops, traced again: perhaps another summation order


@pytest.fixture(scope="module")
def bert():
    """A BERT with a perturbed LoRA (q, v) and (IA)^3 adapter, both active."""
    model = build("bert")
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(init_weights="bert"))
    gm.add_adapter("ia3", "ia3", set_active=True)
    for seed, name in enumerate(("lora", "ia3")):
        perturb_(gm.adapter_state_dict(name).values(), seed=seed)
    return model, gm


def _graph_inputs(gm, model, **kw) -> dict:
    return gm._fx_inputs.bind(type(model).__name__, (), inputs_for(model, **kw))


def _eval_output(gm, inputs) -> torch.Tensor:
    was = gm.training
    gm.eval()
    with torch.no_grad():
        out = gm(**inputs)
    gm.train(was)
    return out


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_torch_export_keeps_dynamic_batch_and_sequence_and_round_trips(bert, tmp_path, merged):
    model, gm = bert
    if merged:
        gm.merge_adapter(["lora", "ia3"])
    try:
        gm.eval()
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
        program = torch.export.export(gm, (), _graph_inputs(gm, model),
                                      dynamic_shapes={k: {0: batch, 1: seq} for k in gm._fx_inputs.names}, strict=False)
        torch.export.save(program, tmp_path / "m.pt2")
        loaded = torch.export.load(tmp_path / "m.pt2").module()
        for shape in ((1, 5), (4, 17)):
            inputs = _graph_inputs(gm, model, batch=shape[0], seq=shape[1])
            expected = _eval_output(gm, inputs)
            for module in (program.module(), loaded):
                got = module(**inputs)
                assert type(got) is type(expected)
                assert_outputs_close(got[0], expected[0], rtol=RTOL)
    finally:
        gm.reset_adapter()


def test_export_writes_pt2_in_eval_mode_with_dynamic_shapes(bert, tmp_path):
    model, gm = bert
    gm.train()
    program = fxadapt.export(gm, tmp_path / "sub" / "bert.pt2")
    assert gm.training, "export leaves the module's mode alone"
    assert not [n for n in program.graph.nodes if "dropout" in str(n.target) or "bernoulli" in str(n.target)]
    loaded = torch.export.load(tmp_path / "sub" / "bert.pt2").module()
    inputs = _graph_inputs(gm, model, batch=5, seq=13)
    got = loaded(**inputs)
    assert_outputs_close(got[0], _eval_output(gm, inputs)[0], rtol=RTOL)
    assert_outputs_close(loaded(**inputs)[0], got[0], rtol=0, atol=0)  # no dropout: deterministic
    gm.eval()


def test_export_of_merged_llama_is_the_base_program(tmp_path):
    """A merged graph exports to the same program as the base model: only the weights differ."""
    model, base = captured("llama")
    torch.manual_seed(0)
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(attn_matrices=("q", "k", "v", "o"), intermediate_lora=True))
    perturb_(gm.adapter_state_dict("lora").values())
    inputs = _graph_inputs(gm, model, pad=False)
    unmerged = _eval_output(gm, inputs)
    gm.merge_adapter("lora")
    program = fxadapt.export(gm, tmp_path / "llama.pt2")
    base = export_program(base)
    assert [str(n.target) for n in program.graph.nodes] == [str(n.target) for n in base.graph.nodes]
    got = torch.export.load(tmp_path / "llama.pt2").module()(**inputs)
    assert not torch.allclose(got.logits, reference(model, inputs).logits)  # the merged weights act
    assert_outputs_close(got.logits, unmerged.logits, rtol=RTOL)  # merged W + BA: rounded once more


def test_export_takes_example_inputs_and_says_what_is_wrong(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 4))
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(targets=["0"], selfattn_lora=False))  # symbolic_trace: no example
    with pytest.raises(fxadapt.ExportError, match="pass example_inputs"):
        fxadapt.export(gm, tmp_path / "m.pt2")
    with pytest.raises(fxadapt.ExportError, match="writes .pt2 or .onnx"):
        fxadapt.export(gm, tmp_path / "m.bin", example_inputs=(torch.randn(2, 4),))
    with pytest.raises(fxadapt.ExportError, match="takes an AdaptedModule"):
        fxadapt.export(model, tmp_path / "m.pt2", example_inputs=(torch.randn(2, 4),))
    gm.train()
    fxadapt.export(gm, tmp_path / "m.pt2", example_inputs=(torch.randn(2, 4),))
    x = torch.randn(7, 4)
    assert_outputs_close(torch.export.load(tmp_path / "m.pt2").module()(x), gm.eval()(x), rtol=rounding_tolerance(torch.float32, 8, depth=2))


@pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra (onnx, onnxscript, onnxruntime) is not installed")
def test_export_onnx_runs_in_onnxruntime_with_the_same_outputs(bert, tmp_path):
    """Unmerged adapters as graph nodes (a merged module exports through the same torch.export program,
    which test_torch_export_keeps_dynamic_batch_and_sequence_and_round_trips[merged] checks)."""
    import onnxruntime

    model, gm = bert
    fxadapt.export(gm, tmp_path / "bert.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "bert.onnx"))
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    for batch, seq in ((1, 4), (3, 19)):
        inputs = _graph_inputs(gm, model, batch=batch, seq=seq)
        expected = _eval_output(gm, inputs)
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        for g, e in zip(got, (expected.last_hidden_state, expected.pooler_output)):
            # onnxruntime's own kernels: its sums in its own order
            assert_outputs_close(torch.from_numpy(g), e, rtol=RTOL)


@pytest.mark.parametrize("config_id", COVERING)
def test_every_method_exports_with_the_eval_outputs(config_id):
    """Every kind of adapter node (conftest.COVERING) exports, in eval semantics."""
    model, gm = captured_one_layer("bert")  # shared with test_compile
    torch.manual_seed(0)  # the adapter's initial weights: the same whatever ran before
    gm.add_adapter("x", CONFIGS[config_id], set_active=True)
    try:
        perturb_(gm.adapter_state_dict("x").values())
        gm.train()
        program = export_program(gm)
        inputs = _graph_inputs(gm, model, batch=3, seq=6)
        expected = _eval_output(gm, inputs)[0]
        assert not torch.allclose(expected, reference(model, inputs)[0])  # the adapter acts in the exported graph too
        assert_outputs_close(program.module()(**inputs)[0], expected, rtol=RTOL)
    finally:
        gm.delete_adapter("x")
        gm.eval()
