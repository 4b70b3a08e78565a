"""Sessions: a conversation's KV contexts kept alive between requests (multi-turn chat, iterative editing).

A session holds the reference's three contexts of everything said so far (cond, no-text, no-image),
so a new turn forks them (O(1) blocks, nothing recomputed) and appends only its new items. When the
turn succeeds its contexts, with the answer text appended, become the session's; when it fails or is
cancelled the session is left as it was. Sessions expire after an idle TTL, are bounded in number,
can be deleted explicitly, and serve one request at a time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from services.common.contracts import (ImageResult, SessionBusy, SessionLost, SessionNotFound, SessionRef,
                                       TooManySessions, UnderstandResult)
from services.llm.engine import CFGContexts, LLMEngine, Steps, Turn


@dataclass
class Session:
    id: str
    state: CFGContexts
    ttl_s: float
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    deleted: bool = False
    turns: int = 0

    @property
    def tokens(self) -> int:
        return self.state.cond.length


class SessionStore:
    def __init__(self, engine: LLMEngine, default_ttl_s: float = 600.0, max_sessions: int = 64):
        self.engine = engine
        self.default_ttl_s = default_ttl_s
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def acquire(self, session_id: str, ttl_s: float | None = None, create: bool = True,
                resume: bool = False) -> Session:
        """The session, marked busy (created empty on first use when `create`). `resume`: the caller
        continues a conversation it had, so a missing or empty session is SessionLost, not a fresh one."""
        self.expire()
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None and resume:
                raise SessionLost(f"session {session_id!r} is gone (expired, deleted, or lost when the LLM "
                                  "server restarted): start a new conversation with its first turn")
            if s is None:
                if not create:
                    raise SessionNotFound(f"unknown session {session_id!r}")
                if len(self._sessions) >= self.max_sessions:
                    raise TooManySessions(f"at most {self.max_sessions} sessions are kept; delete one or wait "
                                          "for one to expire")
                cache = self.engine.cache
                state = CFGContexts(cache.new_context(), cache.new_context(), None, track_noimg=True)
                s = self._sessions[session_id] = Session(session_id, state, ttl_s or self.default_ttl_s)
            if s.busy:
                raise SessionBusy(f"session {session_id!r} is serving another request")
            if resume and s.turns == 0:  # created by a first turn that failed: it holds no conversation
                raise SessionLost(f"session {session_id!r} has no completed turn to continue: start a new "
                                  "conversation with its first turn")
            s.busy = True
            if ttl_s:
                s.ttl_s = ttl_s
            return s

    def release(self, s: Session) -> None:
        with self._lock:
            s.busy = False
            s.last_used = time.monotonic()
            if s.deleted:
                self._drop(s)

    def adopt(self, s: Session, turn: Turn) -> None:
        """A turn succeeded: its contexts become the session's (the old ones are freed)."""
        if turn.contexts is None:
            raise ValueError("the turn was run without its session's contexts")
        old, s.state = s.state, turn.contexts
        s.turns += 1
        self.engine.free(old)

    def delete(self, session_id: str) -> None:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise SessionNotFound(f"unknown session {session_id!r}")
            if s.busy:  # freed when its request ends
                s.deleted = True
            else:
                self._drop(s)

    def expire(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [s for s in self._sessions.values() if not s.busy and now - s.last_used > s.ttl_s]
            for s in stale:
                self._drop(s)
        return len(stale)

    def close(self) -> None:
        with self._lock:
            for s in list(self._sessions.values()):
                self._drop(s)

    def _drop(self, s: Session) -> None:
        self._sessions.pop(s.id, None)
        self.engine.free(s.state)


class InProcessLLM:
    """The workflows' LLM client over an engine in this process: the same calls, and the same typed
    `session` parameter, as the gRPC client (services/orchestrator/remote.py), each request run alone."""

    def __init__(self, engine: LLMEngine, sessions: SessionStore | None = None):
        self.engine = engine
        self.sessions = sessions or SessionStore(engine)

    def understand(self, items, params=None, think: bool = False, controls=None,
                   session: SessionRef | None = None) -> UnderstandResult:
        return self._turn(session, lambda base: self.engine.understand_steps(items, params, think, controls, base))

    def generate_image(self, items, params, think: bool = False, think_params=None, controls=None,
                       session: SessionRef | None = None, batch_cfg: bool = True) -> ImageResult:
        return self._turn(session, lambda base: self.engine.generate_image_steps(items, params, think, think_params,
                                                                                 controls, base), batch_cfg)

    def delete_session(self, session_id: str) -> bool:
        try:
            self.sessions.delete(session_id)
        except SessionNotFound:
            return False
        return True

    def _turn(self, ref: SessionRef | None, make: Callable[[CFGContexts | None], Steps], batch_cfg: bool = True):
        if ref is None:
            return self.engine.drive(make(None), batch_cfg).result
        s = self.sessions.acquire(ref.id, ref.ttl_s or None, resume=ref.resume)
        try:
            turn = self.engine.drive(make(s.state), batch_cfg)
            self.sessions.adopt(s, turn)
            return turn.result
        finally:
            self.sessions.release(s)
