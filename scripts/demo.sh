#!/usr/bin/env bash
# Sets up ./.venv if needed, then runs the demo: a tiny random BB3-style checkpoint is generated,
# resharded, inspected, verified, served and chatted with. Output goes to ./demo-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/opt-demo "$@"
