#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project with pinned dependencies. Idempotent: a stamp
# of pyproject.toml skips pip when nothing changed. torch==2.13.0 is the CPU wheel (see docs/setup.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.bagel-serve-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first and alone, pinned, so nothing else can pull a CUDA build in.
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[test]"
    echo "$want" > "$stamp"
fi
# The playground's browser test drives the system Chromium (Playwright's own browser downloads are not
# used). Best effort: without root or apt-get, or if the install fails, that test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
        && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "setup: chromium could not be installed; the playground browser test will skip" >&2
fi
