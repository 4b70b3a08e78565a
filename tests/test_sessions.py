"""Sessions: a conversation's contexts kept between turns, equal to replaying the whole history."""

from __future__ import annotations

import pytest
import torch

from services.llm.engine import Controls, ImageParams, TextItem, TextParams, ViTImageItem, Cancelled
from services.llm.sessions import SessionBusy, SessionNotFound, SessionStore, TooManySessions


def vit(seed):
    return ViTImageItem(torch.randn(4, 48, generator=torch.Generator().manual_seed(seed)), (2, 2))


def test_second_turn_equals_replaying_the_history(engine):
    store = SessionStore(engine)
    p = TextParams(max_new_tokens=4)
    s = store.acquire("chat")
    first = engine.understand([vit(0), TextItem("what is this?")], p, session=s)
    store.release(s)
    assert s.turns == 1 and s.tokens > 0
    s = store.acquire("chat")
    second = engine.understand([TextItem("and the colour?")], p, session=s)
    store.release(s)
    history = [vit(0), TextItem("what is this?"), TextItem(engine.tok.decode(engine.tok.encode(first.text))),
               TextItem("and the colour?")]
    assert second.text == engine.understand(history, p).text
    # generation in the session sees the whole conversation, its three contexts included
    img = ImageParams(width=32, height=32, num_timesteps=3, seed=1, cfg_img_scale=2.0)
    s = store.acquire("chat")
    in_session = engine.generate_image([TextItem("draw it")], img, session=s).latent
    store.release(s)
    replay = engine.generate_image(history + [TextItem(second.text), TextItem("draw it")], img).latent
    torch.testing.assert_close(in_session, replay, atol=1e-5, rtol=1e-5)
    store.delete("chat")
    assert len(store) == 0


def test_failed_turn_leaves_the_session_unchanged(engine):
    store = SessionStore(engine)
    s = store.acquire("a")
    engine.understand([TextItem("hello")], TextParams(max_new_tokens=2), session=s)
    before = (s.state.cond.length, s.turns)
    controls = Controls()
    controls.on_progress = lambda p: controls.cancel.set()
    with pytest.raises(Cancelled):
        engine.understand([TextItem("more")], TextParams(max_new_tokens=9), controls=controls, session=s)
    assert (s.state.cond.length, s.turns) == before
    store.release(s)
    store.close()


def test_busy_unknown_limits_and_expiry(engine):
    store = SessionStore(engine, default_ttl_s=60, max_sessions=2)
    a = store.acquire("a")
    with pytest.raises(SessionBusy):
        store.acquire("a")
    store.acquire("b")
    with pytest.raises(TooManySessions):
        store.acquire("c")
    with pytest.raises(SessionNotFound, match="unknown session 'zzz'"):
        store.acquire("zzz", create=False)
    with pytest.raises(SessionNotFound):
        store.delete("zzz")
    engine.understand([TextItem("hi")], TextParams(max_new_tokens=2), session=a)
    held = engine.cache.blocks_in_use
    assert held > 0
    store.delete("a")  # busy: freed when released
    assert engine.cache.blocks_in_use == held
    store.release(a)
    assert engine.cache.blocks_in_use == 0 and len(store) == 1
    b = store._sessions["b"]
    store.release(b)
    assert store.expire(now=b.last_used + 61) == 1 and len(store) == 0
