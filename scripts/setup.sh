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
# Reinstalled when the dependencies or the build change, or a .proto does: the install generates the
# bagel.v1 code (setup.py).
want=$(cat pyproject.toml setup.py proto/bagel/v1/*.proto | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first and alone, pinned, so nothing else can pull a CUDA build in.
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[test]"
    echo "$want" > "$stamp"
fi
