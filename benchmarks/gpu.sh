#!/usr/bin/env bash
# The GPU tests and the benchmark on a GPU in bfloat16, end to end in one short run: install what is
# missing, run, write the results. Under 10 minutes in all; every step has its own time limit.
#
#   benchmarks/gpu.sh [OUT_DIR]          CUDA: tests/test_gpu.py -> OUT_DIR/gpu_tests.txt, then the benchmark,
#                                        bf16, roberta-base shape -> OUT_DIR/bench.md, bench.json, env.txt,
#                                        then generation (benchmarks/generation.py) -> OUT_DIR/generation.md, .json
#   benchmarks/gpu.sh --smoke [OUT_DIR]  CPU, tiny shapes (what tests/test_benchmarks.py runs)
#
# OUT_DIR defaults to $OUT, else benchmarks/results. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi
out="${1:-${OUT:-benchmarks/results}}"
python="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # fxadapt from this checkout, installed or not

if [[ $smoke == 1 ]]; then
  args=(--smoke)
  gen=(--smoke)
else
  # Keep a torch that sees the GPU; otherwise install torch 2.13 (PyPI's Linux wheel is a CUDA build).
  if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    timeout 240 "$python" -m pip install -q "torch==2.13.0"
  fi
  "$python" -c "import transformers, peft, pytest, hypothesis" 2>/dev/null ||
    timeout 120 "$python" -m pip install -q "transformers>=5" "peft>=0.21" networkx safetensors pytest hypothesis
  args=(--device cuda --dtype bfloat16 --rewrite-repeats 3)
  gen=(--device cuda --dtype bfloat16 --compile)
fi
tests=0

{
  date -u
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
} > "$out/env.txt" 2>&1
if [[ $smoke == 0 ]]; then
  timeout 150 "$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt" || tests=$?
fi
timeout 320 "$python" benchmarks/bench.py "${args[@]}" --json "$out/bench.json" | tee "$out/bench.md"
timeout 120 "$python" benchmarks/generation.py "${gen[@]}" --json "$out/generation.json" | tee "$out/generation.md"
exit $tests
