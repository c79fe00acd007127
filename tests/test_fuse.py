"""Graph optimisations (fxadapt.passes.fuse): LoRA A fusion, dead dropout removal, eval
specialisation, the merged-graph checker, and code generation that looks submodules up once. Each: rewrite, lint, compare against the unoptimised graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxadapt
from conftest import build, inputs_for
from fxadapt.testing import assert_outputs_close, rounding_tolerance
from fxadapt.passes.insert import OPTIMIZATIONS
from fxadapt.passes.dropout import RATE_MODULE
from fxadapt.passes.fuse import (
    FuseOptions, adapter_nodes, check_merged, get_options, hoist_attribute_paths, optimize, remove_dead_dropout,
    set_options, specialize_eval,
)

aten = torch.ops.aten


def _lora_a_linears(gm) -> list:
    """linear nodes that multiply by a lora_A (directly, or by a concatenation of them)."""
    def reads_a(n):
        return n.op == "get_attr" and str(n.target).endswith(".lora_A") or (n.target is aten.cat.default and all(map(reads_a, n.args[0])))
    return [n for n in gm.graph.nodes if n.target is aten.linear.default and reads_a(n.args[1])]


def _grads(gm, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gm.zero_grad(set_to_none=True)
    out = gm(**inputs)[0]
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad for n, p in gm.named_parameters() if n.endswith("lora_A")}


def test_optimize_is_registered_and_fusion_is_off_by_default():
    assert optimize in OPTIMIZATIONS
    assert get_options(nn.Linear(2, 2)) == FuseOptions(fuse_lora_a=False, remove_dead_dropout=True)


@pytest.mark.parametrize("arch, config, per_layer", [
    ("bert", fxadapt.LoRAConfig(attn_matrices=("q", "k", "v"), init_weights="bert"), 1),
    ("llama", fxadapt.LoRAConfig(attn_matrices=("q", "k", "v"), intermediate_lora=True, init_weights="bert"), 2),  # qkv; gate+up
    ("gpt2", fxadapt.LoRAConfig(attn_matrices=("q", "k", "v"), init_weights="bert"), 1),  # fused c_attn: three sites, one input
])
def test_fuse_lora_a_is_one_matmul_per_input_with_the_same_values_and_gradients(arch, config, per_layer):
    model = build(arch)
    gm = fxadapt.rewrite(model, config)
    gm.train_adapter("lora")
    gm.eval()  # no dropout, so both graphs compute exactly the same function
    inputs = inputs_for(model)
    unfused_linears = len(_lora_a_linears(gm))
    out, grads = _grads(gm, inputs)

    set_options(gm, fuse_lora_a=True)
    gm.graph.lint()
    assert len(_lora_a_linears(gm)) == per_layer * 2 < unfused_linears  # 2 layers
    assert all(n.args[1].target is aten.cat.default for n in _lora_a_linears(gm))
    fused_out, fused_grads = _grads(gm, inputs)
    # one matmul with the A's concatenated: the same sums, perhaps blocked otherwise by the BLAS
    assert_outputs_close(fused_out, out, rtol=rounding_tolerance(torch.float32, 64, depth=2))
    assert fused_grads.keys() == grads.keys() and len(grads) == unfused_linears
    for name, g in grads.items():
        assert fused_grads[name] is not None and fused_grads[name].abs().sum() > 0, name
        assert_outputs_close(fused_grads[name], g, rtol=rounding_tolerance(torch.float32, 64 * 33, depth=2))

    set_options(gm, fuse_lora_a=False)
    assert len(_lora_a_linears(gm)) == unfused_linears


def test_fuse_lora_a_leaves_adapters_with_their_own_dropout_alone():
    """LoRA dropout draws a mask per adapter: those A projections do not read the same node."""
    model = build("bert")
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(attn_matrices=("q", "k", "v"), dropout=0.1))
    before = len(_lora_a_linears(gm))
    set_options(gm, fuse_lora_a=True)
    assert len(_lora_a_linears(gm)) == before


def test_set_options_rejects_unknown_names_and_values():
    gm = fxadapt.capture(build("bert"))
    with pytest.raises(fxadapt.ConfigError, match="unknown optimisation 'fuse_everything'"):
        set_options(gm, fuse_everything=True)
    with pytest.raises(fxadapt.ConfigError, match="must be True or False"):
        set_options(gm, fuse_lora_a="yes")


class _ZeroDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        x = F.dropout(x, p=0.0, training=True)
        return F.dropout(self.lin(x), p=0.5, training=False) + F.dropout(x, p=0.3, training=self.training)


def test_remove_dead_dropout_removes_only_dropouts_that_cannot_drop():
    gm = torch.fx.symbolic_trace(_ZeroDropout())
    assert remove_dead_dropout(gm.graph) == 2
    gm.graph.lint()
    gm.recompile()
    left = [n for n in gm.graph.nodes if "dropout" in str(n.target)]
    assert len(left) == 1 and left[0].kwargs["p"] == 0.3


def test_models_without_dropout_rates_have_no_dropout_node():
    model = build("bert")
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    gm = fxadapt.capture(model)
    assert not any("dropout" in str(n.target) for n in gm.graph.nodes)
    set_options(gm, remove_dead_dropout=False)
    assert any("dropout" in str(n.target) for n in gm.graph.nodes)
    inputs = inputs_for(model)
    with torch.no_grad():
        kept = gm(**inputs)[0]
        set_options(gm, remove_dead_dropout=True)
        assert torch.equal(gm(**inputs)[0], kept)


def test_specialize_eval_leaves_no_dropout_and_computes_eval_mode():
    model = build("bert")
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(dropout=0.2, init_weights="bert"))
    graph = gm.graph
    assert any(n.op == "call_module" and n.target == RATE_MODULE for n in graph.nodes)
    from fxadapt.export import eval_graph_module

    gm.train()
    frozen = eval_graph_module(gm)
    assert gm.training and gm.graph is graph  # the module itself is untouched
    assert not any("dropout" in str(n.target) or n.target == RATE_MODULE for n in frozen.graph.nodes)
    inputs = gm._fx_inputs.bind("BertModel", (), inputs_for(model))
    with torch.no_grad():
        got = frozen(**inputs)[0]
        gm.eval()
        assert torch.equal(got, gm(**inputs)[0])
    specialize_eval(frozen.graph)  # nothing left to do
    assert len(frozen.graph.nodes) == len(eval_graph_module(gm).graph.nodes)


def test_check_merged_accepts_merged_graphs_only():
    model = build("bert")
    base = fxadapt.capture(model)
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(attn_matrices=("q", "k", "v", "o"), intermediate_lora=True, output_lora=True))
    gm.add_adapter("ia3", "ia3", set_active=True)
    with pytest.raises(fxadapt.MergeError, match="adapter node"):
        check_merged(gm)
    assert any(str(n.target).endswith(".lora_A") for n in adapter_nodes(gm))
    gm.merge_adapter(["lora", "ia3"])
    assert adapter_nodes(gm) == []
    check_merged(gm, base)
    # A graph with one extra (non-adapter) node is not the base graph either.
    other = fxadapt.capture(model)
    last = next(n for n in reversed(other.graph.nodes) if n.op == "call_function")
    with other.graph.inserting_after(last):
        other.graph.call_function(aten.clone.default, (last,))
    with pytest.raises(fxadapt.MergeError, match="is not the given base graph"):
        check_merged(gm, other)


def test_check_merged_with_fused_lora_a_before_the_merge():
    model = build("llama")
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(attn_matrices=("q", "k", "v"), intermediate_lora=True, init_weights="bert"))
    set_options(gm, fuse_lora_a=True)
    with pytest.raises(fxadapt.MergeError):
        check_merged(gm)
    gm.merge_adapter("lora")
    check_merged(gm, fxadapt.capture(model))


class _CountLookups:
    """Counts nn.Module.__getattr__ calls (lookups of parameters, buffers and submodules) while on."""

    def __enter__(self):
        self.count, original = 0, nn.Module.__getattr__
        self._original = original

        def counting(module, name):
            self.count += 1
            return original(module, name)

        nn.Module.__getattr__ = counting
        return self

    def __exit__(self, *exc):
        nn.Module.__getattr__ = self._original


def test_generated_code_looks_each_submodule_up_once_and_computes_what_the_graph_does():
    model = build("llama")
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(init_weights="bert", attn_matrices=("q", "k", "v", "o")))
    inputs = gm._fx_inputs.bind("LlamaForCausalLM", (), inputs_for(model))
    graph_copy, origin = hoist_attribute_paths(gm.graph)
    graph_copy.lint()
    assert set(origin.values()) == set(gm.graph.nodes) and all(n.op != "get_attr" or "." not in n.target for n in graph_copy.nodes)
    paths = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    modules = {".".join(t.split(".")[:i]) for t in paths for i in range(1, t.count(".") + 1)}
    with torch.no_grad(), _CountLookups() as lookups:
        got = torch.fx.GraphModule.__call__(gm, **inputs)  # forward alone: no hooks
    assert lookups.count <= len(paths) + len(modules) + 2  # + the dropout-rate module and the guards
    with torch.no_grad():
        expected = torch.fx.Interpreter(gm).run(*inputs.values())  # the graph itself, node by node
    assert torch.equal(got.logits, expected.logits)  # bit for bit, ATen ops called through torch's bindings too
    assert "torch._C._nn.linear(" in gm.code and "torch.ops.aten.linear" not in gm.code


def test_generated_code_reads_weights_that_were_replaced_after_the_rewrite():
    model = build("bert")
    gm = fxadapt.rewrite(model, "lora")
    inputs = inputs_for(model)
    query = gm.get_submodule("encoder.layer.0.attention.self.query")
    with torch.no_grad():
        before = gm(**inputs)[0]
        zeros = {"encoder.layer.0.attention.self.query.weight": torch.zeros_like(query.weight)}
        swapped = torch.func.functional_call(gm, zeros, (), inputs)[0]
        query.weight = nn.Parameter(torch.zeros_like(query.weight))
        assigned = gm(**inputs)[0]
    assert not torch.allclose(before, assigned)
    assert torch.equal(swapped, assigned)
