"""The gateway and the worker ship in a slim image: importing them loads neither torch nor any model code
(checked in a fresh interpreter, as the process starts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "triton", "safetensors", "services.llm", "services.vit", "services.vae", "services.attention")


def _modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("role, code", [
    ("gateway", "import services.orchestrator.gateway"),
    ("worker", "import services.orchestrator.celery_app"),
    ("worker's job path", "from services.orchestrator import runner, remote, workflows, plan"),
    # `bagel-serve gateway` / `bagel-serve worker`: the command line itself must not load the model code
    ("command line", "from services.cli import build_parser; build_parser().parse_args(['gateway'])"),
])
def test_role_imports_no_torch_and_no_model_code(role, code):
    loaded = _modules_after(code)
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == [], f"the {role} loads {heavy[:8]}"
    assert "services.common.contracts" in loaded  # the shared types it does use


def test_the_check_would_see_torch():
    """The same check on a model service's module does find torch (so the test above is not vacuous)."""
    loaded = _modules_after("import services.llm.engine")
    assert "torch" in loaded and "services.llm.engine" in loaded
