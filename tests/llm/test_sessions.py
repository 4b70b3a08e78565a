"""Sessions: a conversation's contexts kept between turns, equal to replaying the whole history."""

from __future__ import annotations

import pytest
import torch

from services.common.contracts import (Cancelled, Controls, ImageParams, SessionBusy, SessionLost, SessionNotFound,
                                       SessionRef, TextItem, TextParams, TooManySessions, ViTImageItem)
from services.llm.sessions import InProcessLLM, SessionStore


def vit(seed):
    return ViTImageItem(torch.randn(4, 48, generator=torch.Generator().manual_seed(seed)), (2, 2))


def test_second_turn_equals_replaying_the_history(engine):
    llm = InProcessLLM(engine)
    chat = SessionRef("chat")
    p = TextParams(max_new_tokens=4)
    first = llm.understand([vit(0), TextItem("what is this?")], p, session=chat)
    s = llm.sessions._sessions["chat"]
    assert s.turns == 1 and s.tokens > 0 and not s.busy
    second = llm.understand([TextItem("and the colour?")], p, session=chat)
    history = [vit(0), TextItem("what is this?"), TextItem(engine.tok.decode(engine.tok.encode(first.text))),
               TextItem("and the colour?")]
    assert second.text == engine.understand(history, p).text
    # generation in the session sees the whole conversation, its three contexts included
    img = ImageParams(width=32, height=32, num_timesteps=3, seed=1, cfg_img_scale=2.0)
    in_session = llm.generate_image([TextItem("draw it")], img, session=chat).latent
    replay = engine.generate_image(history + [TextItem(second.text), TextItem("draw it")], img).latent
    torch.testing.assert_close(in_session, replay, atol=1e-5, rtol=1e-5)
    assert llm.delete_session("chat") and not llm.delete_session("chat")
    assert len(llm.sessions) == 0


def test_a_resumed_turn_needs_the_session_it_continues(engine):
    llm = InProcessLLM(engine)
    p = TextParams(max_new_tokens=2)
    with pytest.raises(SessionLost, match="is gone"):  # never silently a fresh conversation
        llm.understand([TextItem("and then?")], p, session=SessionRef("c", resume=True))
    assert len(llm.sessions) == 0
    llm.sessions.acquire("c")  # created, but its first turn never completed
    llm.sessions.release(llm.sessions._sessions["c"])
    with pytest.raises(SessionLost, match="no completed turn"):
        llm.understand([TextItem("and then?")], p, session=SessionRef("c", resume=True))
    llm.understand([TextItem("hello")], p, session=SessionRef("c"))
    llm.understand([TextItem("and then?")], p, session=SessionRef("c", resume=True))
    assert llm.sessions._sessions["c"].turns == 2
    llm.sessions.close()


def test_failed_turn_leaves_the_session_unchanged(engine):
    llm = InProcessLLM(engine)
    llm.understand([TextItem("hello")], TextParams(max_new_tokens=2), session=SessionRef("a"))
    s = llm.sessions._sessions["a"]
    before = (s.state.cond.length, s.turns)
    controls = Controls()
    controls.on_progress = lambda p: controls.cancel.set()
    with pytest.raises(Cancelled):
        llm.understand([TextItem("more")], TextParams(max_new_tokens=9), controls=controls, session=SessionRef("a"))
    assert (s.state.cond.length, s.turns) == before and not s.busy
    llm.sessions.close()


def test_a_turn_returns_new_contexts_and_leaves_its_base_alone(engine):
    store = SessionStore(engine)
    s = store.acquire("a")
    base_blocks, base_length = list(s.state.cond.blocks), s.state.cond.length
    turn = engine.drive(engine.understand_steps([TextItem("hi")], TextParams(max_new_tokens=2), base=s.state))
    assert turn.contexts is not None and turn.contexts.cond is not s.state.cond
    assert (s.state.cond.blocks, s.state.cond.length) == (base_blocks, base_length)
    assert turn.contexts.cond.length > base_length
    store.adopt(s, turn)
    assert s.state is turn.contexts and s.turns == 1
    alone = engine.drive(engine.understand_steps([TextItem("hi")], TextParams(max_new_tokens=2)))
    assert alone.contexts is None  # freed by the engine
    with pytest.raises(ValueError):
        store.adopt(s, alone)
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
    store.adopt(a, engine.drive(engine.understand_steps([TextItem("hi")], TextParams(max_new_tokens=2), base=a.state)))
    held = engine.cache.blocks_in_use
    assert held > 0
    store.delete("a")  # busy: freed when released
    assert engine.cache.blocks_in_use == held
    store.release(a)
    assert engine.cache.blocks_in_use == 0 and len(store) == 1
    b = store._sessions["b"]
    store.release(b)
    assert store.expire(now=b.last_used + 61) == 1 and len(store) == 0
