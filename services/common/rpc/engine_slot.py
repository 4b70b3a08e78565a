"""The engine a servicer calls: empty until the weights are loaded, then used by one request at a time.

The model runs one call at a time (a second forward on the same device would only contend with the
first), so admitted requests wait here; how many wait is the queue depth metric. The wait honours the
request's deadline.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Generic, Iterator, TypeVar

import grpc

from services.common.rpc.deadlines import check_active, time_remaining
from services.common.contracts import DeadlineExceeded, NotReady

E = TypeVar("E")


class EngineSlot(Generic[E]):
    def __init__(self, queue_gauge=None):
        self._engine: E | None = None
        self._lock = threading.Lock()
        self._queue = queue_gauge

    def set(self, engine: E) -> None:
        self._engine = engine

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def peek(self) -> E:
        """The engine, for reading its configuration; NotReady while loading."""
        if self._engine is None:
            raise NotReady("the model is still loading; retry shortly")
        return self._engine

    @contextmanager
    def use(self, context: grpc.ServicerContext | None = None) -> Iterator[E]:
        engine = self.peek()
        timeout = time_remaining(context)
        if self._queue is not None:
            self._queue.inc()
        try:
            acquired = self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))
        finally:
            if self._queue is not None:
                self._queue.dec()
        if not acquired:
            raise DeadlineExceeded("the deadline passed while waiting for the model")
        try:
            check_active(context)
            yield engine
        finally:
            self._lock.release()
