"""Export: torch.export of adapted and merged modules with dynamic batch and sequence, .pt2 save/load,
fxadapt.export to .pt2 and .onnx (onnxruntime reproduces the outputs), eval-mode semantics."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers as T

import fxadapt
from conftest import _ENCODER, build, captured, inputs_for
from fxadapt.export import export_program

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture(scope="module")
def bert():
    """A BERT with a perturbed LoRA (q, v) and (IA)^3 adapter, both active."""
    model = build("bert")
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(init_weights="bert"))
    gm.add_adapter("ia3", "ia3", set_active=True)
    for name in ("lora", "ia3"):
        for i, p in enumerate(gm.adapter_state_dict(name).values()):
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
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
                torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
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
    torch.testing.assert_close(got[0], _eval_output(gm, inputs)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded(**inputs)[0], got[0], rtol=0, atol=0)  # no dropout: deterministic
    gm.eval()


def test_export_of_merged_llama_is_the_base_program(tmp_path):
    """A merged graph exports to the same program as the base model: only the weights differ."""
    model, base = captured("llama")
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(attn_matrices=("q", "k", "v", "o"), intermediate_lora=True))
    with torch.no_grad():
        for p in gm.adapter_state_dict("lora").values():
            p.add_(torch.randn_like(p) * 0.1)
    inputs = _graph_inputs(gm, model, pad=False)
    unmerged = _eval_output(gm, inputs)
    gm.merge_adapter("lora")
    program = fxadapt.export(gm, tmp_path / "llama.pt2")
    base = export_program(base)
    assert [str(n.target) for n in program.graph.nodes] == [str(n.target) for n in base.graph.nodes]
    got = torch.export.load(tmp_path / "llama.pt2").module()(**inputs)
    torch.testing.assert_close(got.logits, unmerged.logits, rtol=1e-4, atol=1e-4)


def test_export_takes_example_inputs_and_says_what_is_wrong(tmp_path):
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
    torch.testing.assert_close(torch.export.load(tmp_path / "m.pt2").module()(x), gm.eval()(x))


@pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra (onnx, onnxscript, onnxruntime) is not installed")
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_export_onnx_runs_in_onnxruntime_with_the_same_outputs(bert, tmp_path, merged):
    import onnxruntime

    model, gm = bert
    if merged:
        gm.merge_adapter(["lora", "ia3"])
    try:
        fxadapt.export(gm, tmp_path / "bert.onnx")
        session = onnxruntime.InferenceSession(str(tmp_path / "bert.onnx"))
        assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
        for batch, seq in ((1, 4), (3, 19)):
            inputs = _graph_inputs(gm, model, batch=batch, seq=seq)
            expected = _eval_output(gm, inputs)
            got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
            for g, e in zip(got, (expected.last_hidden_state, expected.pooler_output)):
                torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-4, atol=1e-4)
    finally:
        gm.reset_adapter()


@pytest.fixture(scope="module")
def one_layer_bert():
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(**{**_ENCODER, "num_hidden_layers": 1})).eval()
    return model, fxadapt.capture(model)


@pytest.mark.parametrize("config_id", sorted(fxadapt.CONFIGS))
def test_every_method_exports_with_the_eval_outputs(one_layer_bert, config_id):
    model, gm = one_layer_bert
    try:
        gm.add_adapter("x", config_id, set_active=True)
    except (fxadapt.SiteError, fxadapt.ConfigError) as e:  # the method does not fit the tiny model
        pytest.skip(f"{config_id} on tiny bert: {e}")
    try:
        with torch.no_grad():
            for i, p in enumerate(gm.adapter_state_dict("x").values()):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        gm.train()
        program = export_program(gm)
        inputs = _graph_inputs(gm, model, batch=3, seq=6)
        torch.testing.assert_close(program.module()(**inputs)[0], _eval_output(gm, inputs)[0], rtol=1e-5, atol=1e-5)
    finally:
        gm.delete_adapter("x")
        gm.eval()
