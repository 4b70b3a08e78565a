"""The attention registry: names, the default and its environment override, lazy imports, clear errors.

What a fresh process imports is checked in a subprocess, so this test process's own imports (the
kernel tests import triton) do not hide anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.attention import (BACKENDS, AttentionMetadata, BackendSpec, BackendUnavailable, SDPABackend,
                                backend_names, default_backend_name, get_backend)

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, **env: str | None) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter at the repository root; env values of None are removed."""
    full = {k: v for k, v in os.environ.items() if k not in env}
    full.update({k: v for k, v in env.items() if v is not None})
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)


def test_names_and_lazy_targets():
    assert backend_names() == ["sdpa", "triton"]
    for name, spec in BACKENDS.items():
        assert spec.name == name
        assert ":" in spec.target  # a "module:attribute" string, not an imported object
    with pytest.raises(TypeError):
        BACKENDS["flash"] = BACKENDS["sdpa"]  # read-only: backends are not registered at run time


def test_unknown_name_lists_the_known_ones(monkeypatch):
    monkeypatch.delenv("BAGEL_ATTENTION_BACKEND", raising=False)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; known backends: sdpa, triton"):
        get_backend("flash")


def test_environment_overrides_the_default_not_an_explicit_name(monkeypatch):
    monkeypatch.delenv("BAGEL_ATTENTION_BACKEND", raising=False)
    assert default_backend_name("cpu") == "sdpa"
    monkeypatch.setenv("BAGEL_ATTENTION_BACKEND", "triton")
    assert default_backend_name("cpu") == "triton"
    assert get_backend("sdpa").name == "sdpa"
    monkeypatch.setenv("BAGEL_ATTENTION_BACKEND", "sdpa")
    assert default_backend_name("cuda") == "sdpa"
    assert isinstance(get_backend(device="cuda"), SDPABackend)
    monkeypatch.setenv("BAGEL_ATTENTION_BACKEND", "nope")
    with pytest.raises(ValueError, match="known backends: sdpa, triton"):
        get_backend(device="cpu")


def test_a_backend_that_cannot_be_imported_is_unavailable_not_a_crash():
    spec = BackendSpec("missing", "services.attention.no_such_module:Backend", "for this test")
    with pytest.raises(BackendUnavailable, match="'missing' cannot be imported here"):
        spec.load()


def test_sdpa_prepare_leaves_the_metadata_alone():
    meta = AttentionMetadata.build([2, 1], [0, 3], [True, False], torch.zeros(2, 1, dtype=torch.int32), 16)
    assert SDPABackend().prepare(meta) is meta
    with pytest.raises(AttributeError):  # frozen: per-batch state goes through prepare(), not attributes
        meta.block_size = 8


def test_sdpa_imports_neither_triton_nor_the_rest_of_the_project_and_switching_needs_no_purge():
    code = """
import sys
from services.attention import get_backend
from services.attention import default_backend_name
assert get_backend("sdpa").name == "sdpa" and default_backend_name("cpu") == "sdpa"
assert "triton" not in sys.modules, "sdpa imported triton"
assert "services.attention.triton.backend" not in sys.modules
# The triton backend, asked for in the same process: imported now, nothing to purge.
assert get_backend("triton").name == "triton"
assert "triton" in sys.modules
assert get_backend("sdpa").name == "sdpa"
assert default_backend_name("cuda") == "triton"
others = [m for m in sys.modules if m.split(".")[:2] in (["services", "llm"], ["services", "vit"],
                                                          ["services", "vae"], ["services", "orchestrator"])]
assert not others, others
print("ok")
"""
    r = run_python(code, TRITON_INTERPRET="1", BAGEL_ATTENTION_BACKEND=None)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_triton_without_gpu_or_interpreter_is_a_clear_error():
    code = """
from services.attention import BackendUnavailable, get_backend
try:
    get_backend("triton")
except BackendUnavailable as e:
    print(e)
else:
    print("no error")
"""
    # No visible GPU and no interpreter: the backend must refuse when it is asked for, not at a launch.
    r = run_python(code, TRITON_INTERPRET=None, CUDA_VISIBLE_DEVICES="", BAGEL_ATTENTION_BACKEND=None)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "needs a CUDA GPU" in r.stdout and "TRITON_INTERPRET=1" in r.stdout, r.stdout
