"""One orchestrator (a worker process, the gateway on real HTTP and gRPC ports, with a token) over the
live servers, shared by the client and CLI tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The orchestrator tests' helper that starts a worker and a gateway on real ports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "orchestrator"))
from orchestra import Orchestrator, settings_for

from client_stack import TOKEN  # noqa: F401 - the gateway's token


@pytest.fixture(scope="session")
def stack(redis_server, vit_server, vae_server, llm_server, store):
    # Its own Redis database: no other test's worker takes these jobs.
    o = Orchestrator(settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}",
                                  redis_url=redis_server.url.rsplit("/", 1)[0] + "/7"), store, auth_token=TOKEN)
    yield o
    o.close()


@pytest.fixture(scope="session")
def urls(stack) -> dict[str, str]:
    return {"http": f"http://127.0.0.1:{stack.proc.http_port}", "grpc": f"grpc://127.0.0.1:{stack.proc.grpc_port}"}
