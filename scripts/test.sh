#!/usr/bin/env bash
# Set everything up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The playground's browser test drives the system Chromium (Playwright's own browser downloads are not
# used). Best effort: without root or apt-get, or if the install fails, that test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
        && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "setup: chromium could not be installed; the playground browser test will skip" >&2
fi
export TRITON_INTERPRET=1  # Triton kernels run on the CPU under the interpreter
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
