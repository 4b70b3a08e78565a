"""The embedded default model: a tiny random checkpoint the project creates on first use."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from services.dev.random_checkpoint import init_checkpoint

DEFAULT_PRESET, DEFAULT_SEED = "tiny", 0


def cache_root() -> Path:
    return Path(os.environ.get("BAGEL_SERVE_CACHE", Path.home() / ".cache" / "bagel-serve"))


def default_checkpoint_dir() -> Path:
    """Path of the embedded default checkpoint, written atomically the first time it is asked for."""
    target = cache_root() / f"{DEFAULT_PRESET}-seed{DEFAULT_SEED}"
    if (target / "ema.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".init-", dir=target.parent))
    try:
        init_checkpoint(DEFAULT_PRESET, tmp, seed=DEFAULT_SEED)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: use theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
