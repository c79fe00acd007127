"""benchmarks/: the GPU script's smoke mode runs the whole benchmark on CPU at tiny shapes and writes
a table with every row and finite ratios; the peak-memory tracker counts what is alive at once."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    if "bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
        sys.modules["bench"] = module = importlib.util.module_from_spec(spec)  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["bench"]


def test_gpu_script_smoke_mode_writes_the_table_with_finite_ratios(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    table = (tmp_path / "bench.md").read_text()
    assert "| row | measurement | fxadapt | other | ratio | target | met |" in table
    assert f"torch {torch.__version__}" in table and "batch 2 x seq 16" in table
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["key"] for r in rows} == set("abcdef")
    assert len([r for r in rows if r["key"] == "a"]) == 2  # eager and compiled
    for r in rows:
        if r["target"] is not None:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
            assert r["met"] in ("yes", "NO")
    assert "torch" in (tmp_path / "env.txt").read_text()


def test_peak_memory_counts_tensors_alive_at_the_same_time():
    bench = _bench()
    mib = 2**20

    def step():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a, b  # both alive together: 3 MiB
        c = torch.empty(mib, dtype=torch.uint8)
        c.view(-1).add_(1)  # views and in-place results are not new memory
        return c

    assert bench.peak_memory(step, "cpu") == 3 * mib


def test_parse_rejects_unknown_groups():
    bench = _bench()
    try:
        bench.parse(["--groups", "train,speed"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--groups speed was accepted")
