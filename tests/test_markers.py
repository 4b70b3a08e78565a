"""The `servers` marker (tests/live_servers.py): every test using a live-server fixture carries it, tests
that start servers themselves are marked by hand, and pure unit tests do not, so `pytest -m "not servers"`
is the fast suite. Checked by collecting real test files in a separate pytest process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = ["tests/orchestrator/test_job_store.py", "tests/orchestrator/test_plan.py", "tests/common/test_storage.py",
         "tests/llm/test_llm_server.py"]
SERVERS = [
    "tests/orchestrator/test_job_store.py::test_named_locks",                # redis_server, via its own fixture
    "tests/common/test_storage.py::test_png_objects_round_trip",             # store
    "tests/llm/test_llm_server.py::test_unset_seed_is_drawn_and_echoed",     # stub -> srv -> store
    "tests/llm/test_llm_server.py::test_wrong_token_is_unauthenticated",     # starts its own server: by hand
]
UNIT = [
    "tests/orchestrator/test_plan.py::test_noise_is_refused",
    "tests/common/test_storage.py::test_config_from_env",
    "tests/llm/test_llm_server.py::test_text_deltas_split_at_think_end_and_hold_back_unfinished_text",
]


def collect(marker: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", marker, *FILES], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return {line.split("[")[0] for line in out.stdout.splitlines() if "::" in line}


@pytest.fixture(scope="module")
def selected():
    return {"servers": collect("servers"), "not servers": collect("not servers")}


def test_live_server_tests_carry_the_marker(selected):
    for test in SERVERS:
        assert test in selected["servers"], test
        assert test not in selected["not servers"], test


def test_unit_tests_do_not(selected):
    for test in UNIT:
        assert test in selected["not servers"], test
        assert test not in selected["servers"], test
    assert not any(t.startswith("tests/orchestrator/test_plan.py") for t in selected["servers"])
    assert not any(t.startswith("tests/orchestrator/test_job_store.py") for t in selected["not servers"])

