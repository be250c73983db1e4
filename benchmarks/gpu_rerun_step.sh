#!/usr/bin/env bash
# Second GPU call of 2026-12-04: the end-to-end step after the set_device fix, and which gpu tests are slow.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index --target /tmp/site benchmarks/wheels/*.whl && export PYTHONPATH="/tmp/site:$PWD"
S="--device cuda --preset sd3-medium-shape --resolution 1024 --batch 4 --layers 4 --iters 8 --warmup 3"
timeout -k 5 100 python3 benchmarks/bench_step.py $S --json "$OUT/bench_step.json" > "$OUT/bench_step.log" 2>&1; echo "bench_step rc=$?"
timeout -k 5 60 python3 benchmarks/bench_step.py $S --all-switches --only fast > "$OUT/bench_step_all.log" 2>&1; echo "bench_step_all rc=$?"
timeout -k 5 45 python3 -m pytest -v -m gpu -p no:cacheprovider -p timeout --timeout 20 --durations 15 -rs tests/ \
  > "$OUT/pytest_gpu.log" 2>&1; echo "pytest_gpu rc=$?"
tail -4 "$OUT/bench_step.log"; tail -3 "$OUT/bench_step_all.log"; grep -E "PASS|FAIL|ERROR|Timeout|passed|failed" "$OUT/pytest_gpu.log" | tail -25
