"""PEFT's ``modules_to_save``: an adapter's own copy of the classification head, against PEFT 0.21 in the
same process (``task_type="SEQ_CLS"`` on a tiny RobertaForSequenceClassification): outputs and gradients
with the same weights, checkpoints both ways; training updates only the copy; merging puts the copy in."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import fxadapt
from fxadapt.errors import AdapterError, CheckpointError, ConfigError, SiteError
from fxadapt.testing import assert_outputs_close, assert_unchanged, relative_error, rounding_tolerance, snapshot

# Two layers of float32 sums over the hidden width 32, then the head's two linears.
RTOL = rounding_tolerance(torch.float32, 32, depth=3)
GRAD_RTOL = rounding_tolerance(torch.float32, 32 * 14, depth=3)  # gradients also sum over batch x sequence
HEAD = ("classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias")


def our_key(param: str) -> str:
    """The adapter_state_dict key of the copy of a base parameter."""
    owner, leaf = param.rsplit(".", 1)
    return f"{owner}.modules_to_save.{leaf}.value"


def peft_key(param: str) -> str:
    """PEFT's name of its copy of a parameter of ``classifier``."""
    return "base_model.model.classifier.modules_to_save.default." + param.removeprefix("classifier.")


def model() -> T.RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = T.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                             max_position_embeddings=64, num_labels=3)
    return T.RobertaForSequenceClassification(config).eval()


def inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def theirs():
    """PEFT's SEQ_CLS LoRA (which keeps a copy of ``classifier``), all its weights moved off their start."""
    m = peft.get_peft_model(model(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                                                     init_lora_weights=False))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".modules_to_save.default." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def test_peft_checkpoints_both_ways(theirs, tmp_path):
    theirs.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {f"base_model.model.{k}" for k in HEAD} <= saved.keys()  # PEFT's keys: no adapter name, no modules_to_save
    with torch.no_grad():
        expected = theirs(**inputs()).logits
        with theirs.disable_adapter():
            plain = theirs(**inputs()).logits
    gm = fxadapt.capture(copy.deepcopy(model()))
    name = gm.load_adapter(tmp_path / "peft", set_active=True)
    assert gm.adapters[name].modules_to_save == ("classifier", "score")  # PEFT's SEQ_CLS names both; roberta has the first
    with torch.no_grad():
        out = gm(**inputs()).logits
    assert relative_error(expected, plain) > 0.05  # the copy and the LoRA matter
    assert_outputs_close(out, expected, rtol=RTOL)
    # and back: PEFT loads fxadapt's file into a fresh model
    gm.save_adapter(tmp_path / "ours", name, format="peft")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    again = peft.PeftModel.from_pretrained(model(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_outputs_close(again(**inputs()).logits, out, rtol=RTOL)


def test_outputs_gradients_and_training_touch_only_the_copy(theirs):
    m = model()
    gm = fxadapt.capture(copy.deepcopy(m))
    gm.add_adapter("a", fxadapt.LoRAConfig(r=4, alpha=8, modules_to_save=["classifier"]))
    ours = gm.adapter_state_dict("a")
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():  # PEFT's weights into ours
        for k in HEAD:
            ours[our_key(k)].copy_(peft_params[peft_key(k)])
        for n, p in peft_params.items():
            if ".lora_" in n:
                module, which = n.removeprefix("base_model.model.").split(".lora_")
                ours[f"{module}.lora_{which.split('.')[0]}"].copy_(p)
    head = {k: gm.get_parameter(k).detach().clone() for k in HEAD}
    gm.train_adapter("a")
    gm.eval()
    theirs.zero_grad()
    out_o, out_t = gm(**inputs()).logits, theirs(**inputs()).logits
    assert_outputs_close(out_o, out_t, rtol=RTOL)
    out_o.pow(2).sum().backward()
    out_t.pow(2).sum().backward()
    for k in HEAD:
        assert_outputs_close(gm.adapter_state_dict("a")[our_key(k)].grad, peft_params[peft_key(k)].grad, rtol=GRAD_RTOL)
        assert gm.get_parameter(k).grad is None and not gm.get_parameter(k).requires_grad  # the base head stays frozen
    torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(gm.get_parameter(k), head[k]) for k in HEAD)
    gm.set_active_adapters(None)  # the base head again
    with torch.no_grad():
        assert_outputs_close(gm(**inputs()).logits, m(**inputs()).logits, rtol=RTOL)


def test_native_round_trip_and_merge_and_unload(tmp_path):
    m = model()
    gm = fxadapt.capture(m)
    gm.add_adapter("a", fxadapt.LoRAConfig(r=4, modules_to_save=["classifier"], init_weights="bert"), set_active=True)
    with torch.no_grad():
        for p in gm.adapter_state_dict("a").values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        out = gm(**inputs()).logits
    gm.save_adapter(tmp_path, "a")
    gm.load_adapter(tmp_path, "b")
    gm.set_active_adapters("b")
    with torch.no_grad():
        assert torch.equal(gm(**inputs()).logits, out)
    gm.set_active_adapters("a")
    head = {k: m.get_parameter(k).detach().clone() for k in HEAD}
    merged = gm.merge_and_unload()
    copies = gm.adapter_state_dict("a")
    for k in HEAD:
        assert torch.equal(merged.get_parameter(k), copies[our_key(k)])
        assert torch.equal(m.get_parameter(k), head[k])  # the user's model keeps its own head
    with torch.no_grad():
        assert_outputs_close(merged(**inputs()).logits, out, rtol=RTOL)
    gm.merge_adapter("a")  # the graph reads the merged head; reset puts the base one back
    with torch.no_grad():
        assert_outputs_close(gm(**inputs()).logits, out, rtol=RTOL)
    gm.reset_adapter("a")
    assert all(gm.get_parameter(k) is m.get_parameter(k) for k in HEAD)


def test_bad_input(tmp_path, theirs):
    with pytest.raises(ConfigError) as e:
        fxadapt.LoRAConfig(modules_to_save=[])
    assert e.value.field == "modules_to_save"
    gm = fxadapt.capture(model())
    gm.add_adapter("a", fxadapt.LoRAConfig(modules_to_save=["classifier"]), set_active=True)
    gm.add_adapter("b", fxadapt.LoRAConfig(modules_to_save=["out_proj"]))
    before = snapshot(gm)
    with pytest.raises(SiteError, match=r"\['pooler'\] names no module"):
        gm.add_adapter("c", fxadapt.LoRAConfig(modules_to_save=["pooler"]))
    with pytest.raises(AdapterError, match="both keep a copy of classifier.out_proj"):
        gm.set_active_adapters(["a", "b"])
    with pytest.raises(AdapterError, match="modules_to_save"):
        gm.average_adapter("m", ["a", "b"], combine_strategy="cat")
    assert_unchanged(gm, before)
    # a PEFT file whose modules_to_save the model lacks
    theirs.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**meta, "modules_to_save": ["head"]}))
    with pytest.raises(CheckpointError, match=r"\['head'\] names no module"):
        gm.load_adapter(tmp_path, "d")
    assert_unchanged(gm, before)
