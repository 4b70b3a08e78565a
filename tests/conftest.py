"""Shared fixtures: one tiny checkpoint per test session, and in-process engines on it. The live-server
fixtures (S3, redis-server, the gRPC model servers) and the `servers` marker rule are in
tests/live_servers.py, registered here for every folder."""

from __future__ import annotations

import pytest

from services.common.checkpoint import Checkpoint
from services.dev.random_checkpoint import init_checkpoint

pytest_plugins = ["live_servers"]


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tmp_path_factory):
    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny-ckpt"), seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_ckpt_dir):
    return Checkpoint(tiny_ckpt_dir)


@pytest.fixture(scope="session")
def vit_engine(tiny_ckpt):
    from services.vit.engine import ViTEngine

    return ViTEngine.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="session")
def vae_engine(tiny_ckpt):
    from services.vae.engine import VAEEngine

    return VAEEngine.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="session")
def clients(tiny_ckpt_dir):
    from services.orchestrator.local import local_clients

    return local_clients(tiny_ckpt_dir, attention="sdpa")


@pytest.fixture(scope="session")
def llm(clients):
    """The shared in-process LLM engine (model, tokenizer, KV cache)."""
    return clients.llm.engine


@pytest.fixture(autouse=True)
def _no_leaked_kv_blocks(request):
    """Every test that used the shared engine must leave no KV block behind."""
    yield
    if "llm" in request.fixturenames or "clients" in request.fixturenames:
        engine = request.getfixturevalue("clients").llm.engine
        assert engine.cache.blocks_in_use == 0, f"{engine.cache.blocks_in_use} KV blocks leaked"


@pytest.fixture()
def cancel_at_step():
    """cancel_at_step(n) -> (controls, steps): Controls that record each progress step and ask to cancel
    when step n is reported."""
    def make(n: int):
        from services.common.contracts import Controls

        steps: list[int] = []
        controls = Controls()

        def on_progress(p):
            steps.append(p.step)
            if p.step == n:
                controls.cancel.set()

        controls.on_progress = on_progress
        return controls, steps

    return make


@pytest.fixture()
def engine(llm):
    """A private engine on the shared model: its own KV cache, checked empty after the test."""
    from services.attention import SDPABackend
    from services.llm.engine import LLMEngine

    eng = LLMEngine(llm.model, llm.tok, attention=SDPABackend(), kv_cache_tokens=16384)
    yield eng
    assert eng.cache.blocks_in_use == 0, f"{eng.cache.blocks_in_use} KV blocks leaked"
