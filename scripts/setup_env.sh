#!/usr/bin/env bash
# Creates ./.venv with the toolkit and its test dependencies (once; again when setup.cfg changes).
# torch is pinned to 2.13.0 here: on CPU machines pip takes the CPU build; an unpinned torch
# would pull a multi-GB CUDA build. GPU users install their own torch first (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(cat setup.cfg pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[test]"
echo "$want" > "$stamp"
