"""One orchestrator (a worker process, the gateway on real HTTP and gRPC ports, with a token) over the
live servers, shared by the client and CLI tests."""

from __future__ import annotations

import pytest

from orchestra import Orchestrator, settings_for

TOKEN = "client-test-token"


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
