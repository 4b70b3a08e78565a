#!/usr/bin/env bash
# Set everything up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1  # Triton kernels run on the CPU under the interpreter
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
