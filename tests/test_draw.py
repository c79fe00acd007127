"""fxadapt.draw: the collapsed graph (boxes and edges) and the PNG / SVG files."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import torch
from PIL import Image

import fxadapt
from conftest import captured
from fxadapt.draw import collapse


def boxes_of(gm):
    boxes = collapse(gm)
    return boxes, {b.key: b for b in boxes}


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "deberta", "t5-encoder"])
def test_every_site_and_attention_is_a_box_and_layers_chain(arch):
    _, gm = captured(arch)
    boxes, by_key = boxes_of(gm)
    sites = [b for b in boxes if b.kind == "site"]
    assert {(b.layer, r) for b in sites for r in b.label.split("\n")[0].split(",")} == {(s.layer, s.role) for s in gm.sites()}
    layers = sorted({s.layer for s in gm.sites()})
    assert [b.layer for b in boxes if b.kind == "attention"] == layers
    assert not [b for b in boxes if b.kind == "adapter"]
    for b in boxes:  # edges go down the rows, at most one layer at a time
        assert all(0 <= b.layer - by_key[p].layer <= 1 for p in b.preds), b
    out = by_key["out"]
    assert out.preds and all(by_key[p].layer == layers[-1] for p in out.preds)


def test_lora_boxes_sit_between_their_site_and_the_attention():
    _, gm = captured("bert")
    gm.add_adapter("lora", "lora", set_active=True)
    try:
        boxes, by_key = boxes_of(gm)
    finally:
        gm.delete_adapter("lora")
    adapters = [b for b in boxes if b.kind == "adapter"]
    assert len(adapters) == 2 * 2  # q and v in each of the 2 layers
    for a in adapters:
        assert a.label == "lora: LoRA"
        site = [by_key[p] for p in a.preds if by_key[p].kind == "site"]
        assert len(site) == 1 and site[0].role in ("q", "v") and site[0].layer == a.layer
        attention = next(b for b in boxes if b.kind == "attention" and b.layer == a.layer)
        assert a.key in attention.preds and site[0].key not in attention.preds  # the LoRA box is in between


def test_unipelt_labels_name_each_method():
    _, gm = captured("bert")
    gm.add_adapter("unipelt", "unipelt", set_active=True)
    try:
        labels = {b.label for b in collapse(gm) if b.kind == "adapter"}
    finally:
        gm.delete_adapter("unipelt")
    assert labels == {"unipelt: LoRA+gate", "unipelt: prefix", "unipelt: prefix+gate", "unipelt: bottleneck"}


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_writes_a_valid_picture(tmp_path, suffix):
    _, gm = captured("bert")
    gm.add_adapter("pfeiffer+inv", "pfeiffer+inv", set_active=True)
    try:
        path = fxadapt.draw(gm, tmp_path / f"graph{suffix}")
    finally:
        gm.delete_adapter("pfeiffer+inv")
    assert path.stat().st_size > 10_000
    if suffix == ".png":
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 800 and image.height > 600
            assert len(set(image.convert("RGB").resize((64, 64)).getdata())) > 10  # not blank
    else:
        root = ET.parse(path).getroot()
        assert root.tag.endswith("svg")
        text = path.read_text()
        assert "pfeiffer+inv: invertible" in text and "pfeiffer+inv: bottleneck" in text and "layer 1" in text


def test_symbolic_trace_module(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(r=2, targets=["0"], selfattn_lora=False))
    boxes = collapse(gm)
    assert [b.kind for b in boxes] == ["input", "adapter", "output"]  # no site roles: only the adapter
    assert fxadapt.draw(gm, tmp_path / "mlp.png").stat().st_size > 1000


def test_errors(tmp_path):
    _, gm = captured("bert")
    with pytest.raises(fxadapt.DrawError, match=r"\.png or \.svg"):
        fxadapt.draw(gm, tmp_path / "graph.pdf")
    with pytest.raises(fxadapt.DrawError, match="AdaptedModule"):
        fxadapt.draw(torch.nn.Linear(2, 2), tmp_path / "graph.png")
