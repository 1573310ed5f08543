#!/usr/bin/env bash
# The GPU checks in one sitting on a device machine: correctness first (scripts/gpu_check.py),
# then the benchmark (scripts/bench_gpu.py), their output and JSON / PNG under $OUT.
#
# The machine has torch, triton, transformers, tokenizers, psutil, prometheus-client and
# safetensors; for --http it lacks flask and waitress. Carry them as Python 3.12 wheels in .whl
# (ignored by git), fetched here once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     flask waitress blinker itsdangerous
# and run with carry [".whl"], HTTP=1 for the HTTP figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
timeout "${CHECK_S:-200}" python3 scripts/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
timeout "${BENCH_S:-330}" python3 scripts/bench_gpu.py --out "$OUT" ${HTTP:+--http} 2>&1 \
  | tee "$OUT/bench_gpu.log"
# BlenderBot 1 against HF generate on the GPU (optional: SEQ=1), the recipe's 128-token replies.
if [ -n "${SEQ:-}" ]; then
  timeout "${SEQ_S:-240}" python3 scripts/bench_seq2seq.py --device cuda --dtype fp16 \
    --max-tokens 128 --rounds 1 --out "$OUT" 2>&1 | tee "$OUT/bench_seq2seq.log"
fi
