#!/usr/bin/env bash
# Sets up ./.venv if needed, then runs the whole test suite (CPU only, about 4-5 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
