"""Checkpoints under failure: crash-safe saving (writers that fail part-way, I/O errors), hostile and
corrupt files (wrong field types, deep nesting, non-finite tensors, ranks asking for terabytes), failures
part-way through a load or an average, and a fuzzer over checkpoint files. A failure raises a typed
error naming the path, field or tensor, and leaves the model, and any earlier checkpoint, as they were."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file, save_file

import fxadapt
import fxadapt.checkpoint
import fxadapt.fsutil
from conftest import captured, inputs_for
from fxadapt.errors import AdapterError, CheckpointError
from fxadapt.methods import METHODS
from fxadapt.testing import assert_unchanged, snapshot
from test_checkpoint import adapterhub_lora_tensors, cleanup, randomize, run, write_adapterhub_lora

NATIVE = ["fxadapt_config.json", "fxadapt_model.safetensors"]
PEFT = ["adapter_config.json", "adapter_model.safetensors"]
FILES = {"fxadapt": NATIVE, "peft": PEFT}


def listing(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def saved(gm, directory: Path, fmt: str, seed: int) -> torch.Tensor:
    """Save a randomized LoRA adapter ``seed`` of the shared BERT capture to ``directory``; its output."""
    inputs = inputs_for(captured("bert")[0])
    with cleanup(gm):
        gm.add_adapter("a", fxadapt.LoRAConfig(r=2, output_lora=True, init_weights_seed=seed), set_active=True)
        randomize(gm, "a", seed)
        gm.save_adapter(directory, "a", format=fmt)
        return run(gm, inputs)[0]


def assert_loads_to(gm, directory: Path, expected: torch.Tensor) -> None:
    inputs = inputs_for(captured("bert")[0])
    with cleanup(gm):
        gm.load_adapter(directory, "back", set_active=True)
        assert torch.equal(run(gm, inputs)[0], expected)


# -- saving: one step, whole ------------------------------------------------------------------------


def test_saving_replaces_every_format_and_keeps_the_users_files(tmp_path):
    """Saving one format where another's files are leaves only the new one's (no stale file for
    load_adapter to prefer), and the directory's other files as they were."""
    _, gm = captured("bert")
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    (d / "logs").mkdir()
    (d / "logs" / "run.txt").write_text("also mine")
    for stale in ("pytorch_adapter.bin", "head_config.json", "pytorch_model_head.bin", "adapter_model.bin"):
        (d / stale).write_bytes(b"stale")
    user = {"notes.txt": b"mine", os.path.join("logs", "run.txt"): b"also mine"}
    first = saved(gm, d, "fxadapt", seed=1)
    assert listing(d).keys() == {*NATIVE, *user}
    second = saved(gm, d, "peft", seed=2)
    files = listing(d)
    assert files.keys() == {*PEFT, *user} and all(files[k] == v for k, v in user.items())
    assert_loads_to(gm, d, second)
    saved(gm, d, "fxadapt", seed=1)
    assert listing(d).keys() == {*NATIVE, *user}
    assert_loads_to(gm, d, first)
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no temporary directory left


def test_saving_through_a_link_writes_where_it_points(tmp_path):
    """A target that is a link to a directory: the checkpoint is written there and the link stays."""
    _, gm = captured("bert")
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    (real / "notes.txt").write_text("mine")
    link.symlink_to(real, target_is_directory=True)
    expected = saved(gm, link, "fxadapt", seed=1)
    assert link.is_symlink() and listing(real).keys() == {*NATIVE, "notes.txt"}
    assert_loads_to(gm, link, expected)


def _partial_writer(real, error: BaseException):
    """A safetensors writer that writes half of the file and then fails."""

    def write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise error

    return write


@pytest.mark.parametrize("fmt", ["fxadapt", "peft"])
@pytest.mark.parametrize("error, raised", [(OSError(errno.ENOSPC, "No space left on device"), CheckpointError),
                                           (RuntimeError("the process died"), RuntimeError),
                                           (KeyboardInterrupt(), KeyboardInterrupt)])
def test_a_writer_failing_part_way_leaves_the_earlier_checkpoint_whole(tmp_path, monkeypatch, fmt, error, raised):
    _, gm = captured("bert")
    d = tmp_path / "ckpt"
    expected = saved(gm, d, fmt, seed=1)
    before = listing(d)
    monkeypatch.setattr(safetensors.torch, "save_file", _partial_writer(safetensors.torch.save_file, error))
    with pytest.raises(raised) as e:
        saved(gm, d, fmt, seed=2)
    monkeypatch.undo()
    if raised is CheckpointError:
        assert e.value.path == str(d) and "No space left" in str(e.value)
    assert listing(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert_loads_to(gm, d, expected)


@pytest.mark.parametrize("fmt", ["fxadapt", "peft"])
def test_a_config_json_cannot_hold_leaves_the_earlier_checkpoint_whole(tmp_path, monkeypatch, fmt):
    _, gm = captured("bert")
    d = tmp_path / "ckpt"
    expected = saved(gm, d, fmt, seed=1)
    before = listing(d)
    real_dump = json.dump

    def dump_part(obj, f, **kwargs):  # writes a third of the JSON, then fails
        f.write(json.dumps(obj, **kwargs)[:40])
        raise RuntimeError("the process died")

    monkeypatch.setattr(json, "dump", dump_part)
    with pytest.raises(RuntimeError, match="died"):
        saved(gm, d, fmt, seed=2)
    monkeypatch.setattr(json, "dump", real_dump)
    assert listing(d) == before
    # A value JSON cannot hold (an object; NaN, which is not JSON) is a CheckpointError naming the file.
    for bad in (object(), float("nan")):
        def with_extra(gm, name, writer=fxadapt.checkpoint._WRITERS[fmt], bad=bad):
            config_name, meta, weights_name, tensors = writer(gm, name)
            return config_name, {**meta, "extra": bad}, weights_name, tensors

        monkeypatch.setitem(fxadapt.checkpoint._WRITERS, fmt, with_extra)
        with pytest.raises(CheckpointError, match="cannot be written as JSON") as e:
            saved(gm, d, fmt, seed=2)
        assert e.value.path == str(d / FILES[fmt][0])
        monkeypatch.undo()
        assert listing(d) == before
    assert_loads_to(gm, d, expected)


def test_non_finite_weights_are_not_saved(tmp_path):
    _, gm = captured("bert")
    with cleanup(gm):
        gm.add_adapter("a", fxadapt.LoRAConfig(r=2))
        key = "encoder.layer.1.attention.self.value.lora_A"
        with torch.no_grad():
            gm.adapter_state_dict("a")[key][0, 1] = float("inf")
        with pytest.raises(CheckpointError, match="NaN or infinite") as e:
            gm.save_adapter(tmp_path / "x", "a")
    assert e.value.tensor == key and not (tmp_path / "x").exists()


def _raise(error):
    def fail(*args, **kwargs):
        raise error

    return fail


@pytest.mark.parametrize("case", ["target is a file", "parent is a file", "makedirs denied", "mkdtemp denied", "rename denied"])
def test_io_failures_raise_checkpoint_error_naming_the_path(tmp_path, monkeypatch, case):
    _, gm = captured("bert")
    target = tmp_path / "ckpt"
    denied = PermissionError(errno.EACCES, "Permission denied")
    if case == "target is a file":
        target.write_text("a file")
    elif case == "parent is a file":
        (tmp_path / "parent").write_text("a file")
        target = tmp_path / "parent" / "ckpt"
    else:  # an earlier checkpoint at the target
        target = tmp_path / "deeper" / "ckpt"
        saved(gm, target, "fxadapt", seed=1)
    before = listing(tmp_path)
    with cleanup(gm):
        gm.add_adapter("a", fxadapt.LoRAConfig(r=2))
        if case.endswith("denied"):  # tests run as root, which no permission stops: make the system call fail
            call = {"makedirs denied": (os, "makedirs"), "mkdtemp denied": (tempfile, "mkdtemp"),
                    "rename denied": (fxadapt.fsutil, "_swap_into_place")}[case]
            monkeypatch.setattr(*call, _raise(denied))
        with pytest.raises(CheckpointError) as e:
            gm.save_adapter(target, "a")
        monkeypatch.undo()
    assert e.value.path == str(target) and str(target) in str(e.value)
    assert listing(tmp_path) == before


# -- loading: fields, nesting, values, sizes ---------------------------------------------------------------


def _peft_dir(tmp_path: Path, gm) -> Path:
    d = tmp_path / "peft"
    saved(gm, d, "peft", seed=1)
    return d


def _edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("field, value", [("use_rslora", "false"), ("lora_dropout", "abc"), ("r", "8"), ("r", 8.0), ("r", True),
                                          ("lora_alpha", None), ("rank_pattern", ["query", 2]), ("target_modules", 5),
                                          ("alpha_pattern", {"query": "2"}), ("lora_dropout", 1.5)])
def test_peft_fields_of_the_wrong_type_or_range_are_refused_by_name(tmp_path, field, value):
    """PEFT's JSON must have PEFT's types: "false" is not read as True, nor "8" as 8."""
    _, gm = captured("bert")
    d = _peft_dir(tmp_path, gm)
    _edit_json(d / "adapter_config.json", **{field: value})
    before = snapshot(gm)
    with pytest.raises(CheckpointError, match=rf"adapter_config\.json: {field}\b") as e:
        gm.load_adapter(d)
    assert e.value.path == str(d / "adapter_config.json")
    assert_unchanged(gm, before)


@pytest.mark.parametrize("fmt", ["fxadapt", "peft"])
@pytest.mark.parametrize("field", ["r", "rank_pattern"])
def test_a_rank_asking_for_terabytes_is_refused_before_anything_is_allocated(tmp_path, monkeypatch, fmt, field):
    """r = 10**9 in a file whose tensors have rank 2: CheckpointError naming the field and the memory the
    adapter would need, raised before add_adapter runs."""
    _, gm = captured("bert")
    d = tmp_path / "ckpt"
    saved(gm, d, fmt, seed=1)
    big = 10**9
    config = d / FILES[fmt][0]
    if fmt == "peft":
        _edit_json(config, **({"r": big} if field == "r" else {"rank_pattern": {"query": big}}))
    else:
        meta = json.loads(config.read_text())
        meta["config"].update({"r": big} if field == "r" else {"rank_pattern": {"query": big}})
        config.write_text(json.dumps(meta))
    # The adapter: q, v and the output dense of 2 layers (32 -> 32 and 64 -> 32), float32.
    sites = {"query": 32 + 32, "value": 32 + 32, "output.dense": 64 + 32}
    need = 2 * 4 * sum((big if field == "r" or site == "query" else 2) * width for site, width in sites.items())
    monkeypatch.setattr(type(gm), "add_adapter", _raise(AssertionError("add_adapter ran")))
    before = snapshot(gm)
    with pytest.raises(CheckpointError) as e:
        gm.load_adapter(d)
    message = str(e.value)
    named = f"rank_pattern['query']={big}" if field == "rank_pattern" else f"r={big}"
    assert named in message and str(config) in message, message
    size = f"{need / 2**40:.1f} TiB" if need >= 2**40 else f"{need / 2**30:.1f} GiB"
    assert f"would need {size}" in message, message
    assert e.value.tensor and "lora_" in e.value.tensor
    assert_unchanged(gm, before)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("fmt", ["fxadapt", "peft"])
@pytest.mark.parametrize("text, message", [
    (_nested(100_000), "nested too deeply"),
    ('{"peft_type": "LORA", "format": "fxadapt", "r": ' + _nested(100_000) + "}", "nested too deeply"),
    ("[1, 2]", "must hold a JSON object"),
    ("not json", "not valid JSON"),
    ("\xff\xfe", "not valid JSON"),
    ('{"peft_type": "LORA", "format": "fxadapt", "r": NaN, "config": {"alpha": Infinity}}', "not a JSON number"),
])
def test_config_files_that_are_not_json_objects_are_refused(tmp_path, fmt, text, message):
    _, gm = captured("bert")
    d = tmp_path / "ckpt"
    saved(gm, d, fmt, seed=1)
    (d / FILES[fmt][0]).write_bytes(text.encode("latin-1"))
    before = snapshot(gm)
    with pytest.raises(CheckpointError, match=message) as e:
        gm.load_adapter(d)
    assert e.value.path == str(d / FILES[fmt][0])
    assert_unchanged(gm, before)


@pytest.mark.parametrize("fmt", ["fxadapt", "peft", "adapterhub"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors_are_refused_by_name(tmp_path, fmt, value):
    _, gm = captured("bert")
    d = tmp_path / "ckpt"
    if fmt == "adapterhub":
        tensors = adapterhub_lora_tensors()
        name = "encoder.layer.1.attention.self.value.loras.lora.lora_B"
        tensors[name][3, 1] = value
        write_adapterhub_lora(d, tensors)
    else:
        saved(gm, d, fmt, seed=1)
        path = d / FILES[fmt][1]
        tensors = load_file(path)
        name = sorted(tensors)[-1]
        tensors[name][0, -1] = value
        save_file(tensors, path)
    before = snapshot(gm)
    with pytest.raises(CheckpointError, match="NaN or infinite") as e:
        gm.load_adapter(d)
    assert e.value.tensor == name and name in str(e.value)
    assert_unchanged(gm, before)


# -- failures part-way: the model as it was ------------------------------------------------------------------


def _failing_fill(monkeypatch, gm, name: str, error: BaseException, after: int = 2):
    """Make the ``after + 1``-th weight copied into adapter ``name`` fail."""
    real = type(gm).adapter_state_dict
    copies = []

    class Failing:
        def __init__(self, tensor):
            self.tensor = tensor

        def copy_(self, source):
            copies.append(1)
            if len(copies) > after:
                raise error
            return self.tensor.copy_(source)

    def state(self, adapter):
        out = real(self, adapter)
        return {k: Failing(v) for k, v in out.items()} if adapter == name else out

    monkeypatch.setattr(type(gm), "adapter_state_dict", state)
    return copies


@pytest.mark.parametrize("operation", ["load", "average"])
@pytest.mark.parametrize("error", [RuntimeError("copy failed"), MemoryError(), KeyboardInterrupt()])
def test_a_failure_while_filling_weights_changes_nothing(tmp_path, monkeypatch, operation, error):
    model, gm = captured("bert")
    inputs = inputs_for(model)
    d = tmp_path / "ckpt"
    with cleanup(gm):
        if operation == "load":
            saved(gm, d, "fxadapt", seed=1)
        else:
            for n, seed in (("x", 1), ("y", 2)):
                gm.add_adapter(n, fxadapt.LoRAConfig(r=2), set_active=n == "x")
                randomize(gm, n, seed)
        before, out = snapshot(gm), run(gm, inputs)[0]
        copies = _failing_fill(monkeypatch, gm, "new", error)
        with pytest.raises(type(error)):
            if operation == "load":
                gm.load_adapter(d, "new", set_active=True)
            else:
                gm.average_adapter("new", ["x", "y"], set_active=True)
        monkeypatch.undo()
        assert len(copies) == 3  # two weights were filled in when the third failed
        assert_unchanged(gm, before)
        assert torch.equal(run(gm, inputs)[0], out)


@pytest.mark.parametrize("where", ["reading", "building"])
def test_memory_errors_in_a_load_change_nothing(tmp_path, monkeypatch, where):
    _, gm = captured("bert")
    d = tmp_path / "ckpt"
    saved(gm, d, "fxadapt", seed=1)
    before = snapshot(gm)
    if where == "reading":
        monkeypatch.setattr(fxadapt.formats.native, "read_tensors", _raise(MemoryError()))  # the format saved above
        expected = MemoryError
    else:  # the third LoRA weights module cannot be allocated: add_adapter undoes the first two
        built = []
        real = METHODS["lora"]

        def build(where, config, like):
            built.append(like.device.type != "meta")  # planning builds on the meta device, allocating nothing
            if sum(built) == 3:
                raise MemoryError()
            return real.build(where, config, like)

        monkeypatch.setitem(METHODS, "lora", dataclasses.replace(real, build=build))
        expected = (MemoryError, CheckpointError)
    with pytest.raises(expected):
        gm.load_adapter(d, "new", set_active=True)
    monkeypatch.undo()
    assert_unchanged(gm, before)


def test_average_adapter_refuses_bad_weights_and_overflow():
    _, gm = captured("bert")
    with cleanup(gm):
        gm.add_adapter("x", fxadapt.LoRAConfig(r=2, dtype="float16"))
        gm.add_adapter("y", fxadapt.LoRAConfig(r=2, dtype="float16"))
        with torch.no_grad():
            gm.adapter_state_dict("x")["encoder.layer.0.attention.self.query.lora_B"].fill_(60000.0)
            gm.adapter_state_dict("y")["encoder.layer.0.attention.self.query.lora_B"].fill_(60000.0)
        before = snapshot(gm)
        for weights, message in (([1.0, "abc"], "must be numbers"), ([1.0, float("nan")], "must be finite"),
                                 ([1.0, 1.0], r"non-finite values in encoder\.layer\.0\.attention\.self\.query\.lora_B")):
            with pytest.raises(AdapterError, match=message):
                gm.average_adapter("avg", ["x", "y"], weights, normalize_weights=False)
            assert_unchanged(gm, before)


# -- fuzzing: corrupt files are refused or read faithfully -------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_templates(tmp_path_factory):
    """Checkpoints of the shared BERT capture in each format (and a bottleneck adapter), and what each
    loads to intact: config, weights, and which file tensor each weight is."""
    _, gm = captured("bert")
    root = tmp_path_factory.mktemp("fuzz")
    for label, config, fmt in (("fxadapt-lora", fxadapt.LoRAConfig(r=2, output_lora=True, rank_pattern={"value": 3}), "fxadapt"),
                               ("fxadapt-seq_bn", "seq_bn", "fxadapt"),
                               ("peft-lora", fxadapt.LoRAConfig(r=2, alpha=4, targets=["pooler.dense"]), "peft")):
        with cleanup(gm):
            gm.add_adapter("a", config)
            randomize(gm, "a", seed=3)
            gm.save_adapter(root / label, "a", format=fmt)
    write_adapterhub_lora(root / "adapterhub-lora", adapterhub_lora_tensors())
    out = {}
    for d in root.iterdir():
        with cleanup(gm):
            gm.load_adapter(d, "t")
            config, state = gm.adapters["t"], {k: v.detach().clone() for k, v in gm.adapter_state_dict("t").items()}
        tensors = _read(d)
        # The randomized weights all differ: a file tensor is a weight when their values are equal.
        source = {k: next(f for f, t in tensors.items() if t.shape == v.shape and torch.equal(t, v)) for k, v in state.items()}
        out[d.name] = (d, config, state, source)
    return out


def _weights_file(d: Path) -> Path:
    return next(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin"))


def _read(d: Path) -> dict[str, torch.Tensor]:
    path = _weights_file(d)
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)


def _write(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = _weights_file(d)
    save_file(tensors, path) if path.suffix == ".safetensors" else torch.save(tensors, path)


def _json_type(value) -> str:
    return {bool: "bool", int: "number", float: "number", str: "str", list: "list", dict: "dict", type(None): "null"}[type(value)]


WRONG_VALUES = [None, True, False, 7, 1.5, -1, "abc", "false", "8", [], [1, "x"], {}, {"k": [1]}, [[[[]]]]]
ATTACKS = ["truncate", "random bytes", "wrong JSON type", "deep nesting", "wrong shape", "wrong dtype", "extra tensor",
           "missing tensor", "non-finite"]


def _attack(data, d: Path, attack: str) -> None:
    """Corrupt the checkpoint in ``d`` one way."""
    files = sorted(p for p in d.iterdir())
    if attack in ("truncate", "random bytes"):
        path = data.draw(st.sampled_from(files), label="file")
        raw = path.read_bytes()
        if attack == "truncate":
            path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="length")])
        else:
            start = data.draw(st.integers(0, len(raw) - 1), label="offset")
            noise = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
            path.write_bytes(raw[:start] + noise + raw[start + len(noise):])
        return
    if attack in ("wrong JSON type", "deep nesting"):
        path = d / ("fxadapt_config.json" if (d / "fxadapt_config.json").exists() else "adapter_config.json")
        meta = json.loads(path.read_text())
        fields = [(k,) for k in meta] + [(k, f) for k, v in meta.items() if isinstance(v, dict) and k == "config" for f in v]
        where = data.draw(st.sampled_from(sorted(fields)), label="field")
        holder = meta if len(where) == 1 else meta[where[0]]
        old = holder[where[-1]]
        if attack == "deep nesting":
            holder[where[-1]] = "@NESTED@"
            depth = data.draw(st.sampled_from([50, 2000, 100_000]), label="depth")
            path.write_text(json.dumps(meta).replace('"@NESTED@"', _nested(depth)))
            return
        # A null field's type is unknown here: replace it only with what no nullable field takes.
        pool = [v for v in WRONG_VALUES if _json_type(v) != _json_type(old) and (old is not None or _json_type(v) in ("bool", "list", "dict"))]
        holder[where[-1]] = data.draw(st.sampled_from(pool), label="value")
        path.write_text(json.dumps(meta))
        return
    tensors = _read(d)
    key = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    t = tensors[key]
    if attack == "wrong shape":
        how = data.draw(st.sampled_from(["grow", "shrink", "unsqueeze", "flatten"]), label="how")
        dim = data.draw(st.integers(0, t.ndim - 1), label="dim")
        if how == "grow":
            t = torch.cat([t, t.narrow(dim, 0, 1)], dim)
        elif how == "shrink" and t.shape[dim] > 1:
            t = t.narrow(dim, 0, t.shape[dim] - 1)
        elif how == "unsqueeze" or t.ndim == 1:
            t = t.unsqueeze(0)
        else:
            t = t.reshape(-1)
        tensors[key] = t.contiguous()
    elif attack == "wrong dtype":
        dtypes = [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.float16, torch.bfloat16, torch.float64]
        tensors[key] = t.to(data.draw(st.sampled_from([x for x in dtypes if x != t.dtype]), label="dtype"))
    elif attack == "extra tensor":
        names = ["pooler.dense.lora_A", f"x.{key}", key + ".extra", "encoder.layer.9.output.dense.lora_B",
                 "base_model.model.pooler.dense.lora_A.weight", "shared_parameters.phm_rule"]
        name = data.draw(st.sampled_from([n for n in names if n not in tensors]), label="name")
        tensors[name] = torch.zeros(data.draw(st.sampled_from([(2, 32), (32, 2), (4,), ()]), label="shape"))
    elif attack == "missing tensor":
        del tensors[key]
    else:  # non-finite
        flat = t.clone().reshape(-1)
        flat[data.draw(st.integers(0, flat.numel() - 1), label="index")] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        tensors[key] = flat.reshape(t.shape)
    _write(d, tensors)


def _config_files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.suffix == ".json"}


def _holds(tensors: dict[str, torch.Tensor], value: torch.Tensor, name: str) -> bool:
    """``value`` is the file's tensor ``name``, or (when random bytes renamed it) one of its tensors."""
    same = lambda t: t.dtype == value.dtype and t.shape == value.shape and torch.equal(t, value)
    return same(tensors[name]) if name in tensors else any(same(t) for t in tensors.values())


def test_fuzzed_checkpoints_are_refused_or_read_faithfully(fuzz_templates):
    """A corrupted checkpoint either raises CheckpointError/AdapterError and leaves the model bit for bit
    as it was, or loads to what the file holds: the weights are the file's tensors, and the config is
    the intact one unless random bytes or a truncation turned a config file into other valid JSON.
    Prints the attacks by class and outcome (run with -s; HYPOTHESIS_PROFILE=thorough for many)."""
    _, gm = captured("bert")
    counts: Counter = Counter()

    @given(st.sampled_from(sorted(fuzz_templates)), st.sampled_from(ATTACKS), st.data())
    def attack(label, kind, data):
        template, config, state, source = fuzz_templates[label]
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / "ckpt"
            shutil.copytree(template, d)
            _attack(data, d, kind)
            before = snapshot(gm)
            try:
                gm.load_adapter(d, "fuzzed")
            except (CheckpointError, AdapterError):
                counts[kind, "refused"] += 1
                assert_unchanged(gm, before)
                return
            try:
                loaded, tensors = gm.adapter_state_dict("fuzzed"), _read(d)
                assert loaded.keys() == state.keys() and len(tensors) == len(state), (kind, sorted(tensors))
                assert all(_holds(tensors, loaded[k], source[k]) for k in state), kind
                edited = kind in ("random bytes", "truncate") and _config_files(d) != _config_files(template)
                same = gm.adapters["fuzzed"] == config
                assert same or edited, (kind, gm.adapters["fuzzed"])
                counts[kind, "loaded as intact" if same and all(torch.equal(loaded[k], v) for k, v in state.items()) else "loaded an edit"] += 1
            finally:
                gm.delete_adapter("fuzzed")
            assert_unchanged(gm, before)

    attack()
    print(f"\ncheckpoint fuzz ({sum(counts.values())} attacks):", dict(sorted(counts.items())))
    assert sum(counts.values()) > 0
