#!/usr/bin/env bash
# Set everything up, then run the main job (every workflow on the embedded default model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/bagel-serve demo --out "${1:-demo-output}"
