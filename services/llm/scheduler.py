"""Step-level batching: one thread owns the engine and, at every iteration, runs one unit of work of
every active request together (all decode steps in one forward, all CFG branches of all denoising
steps in another). Requests that overlap in time therefore share forwards.

A request is the engine's step generator (`understand_steps`, `generate_image_steps`); admitting it
runs its context building, then the loop feeds it the results of its units. Cancellation (the
request's `Controls.cancel`, set by a client cancel or a deadline) takes effect between two steps:
the generator raises `Cancelled` at its next check and its `finally` blocks free its KV blocks.

Shared forwards change a request's floating-point reduction order with whatever else is running, so
its result may differ in the last bit from a solo run. `batch_invariant=True` trades throughput for
reproducibility: each request's unit runs in a forward of its own (its CFG branches still batched
together, exactly as `LLMEngine.drive` runs a request alone), so a result never depends on the batch.
Requests still advance together, one step each per iteration.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from services.common.contracts import Cancelled, Controls, Unavailable
from services.llm.engine import CFGContexts, DecodeUnit, LLMEngine, Steps, Unit

log = logging.getLogger(__name__)


@dataclass
class _Request:
    make_steps: Callable[[], Steps]
    controls: Controls
    future: Future
    steps: Steps | None = None
    unit: Unit | None = None
    submitted: float = field(default_factory=time.monotonic)


class SchedulerClosed(Unavailable):
    """The scheduler is shutting down and takes no new request."""


def unit_tokens(unit: Unit) -> int:
    if isinstance(unit, DecodeUnit):
        return 1
    return (unit.x.shape[0] + 2) * 3  # at most three CFG branches of the query block


class Scheduler:
    def __init__(self, engine: LLMEngine, max_batch_tokens: int = 32768,
                 on_batch: Callable[[int], None] | None = None, batch_invariant: bool = False):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.on_batch = on_batch  # called with the number of requests sharing each forward of units
        self.batch_invariant = batch_invariant  # one forward per request: results as in a solo run
        self._incoming: queue.Queue[_Request] = queue.Queue()
        self._active: list[_Request] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llm-scheduler", daemon=True)
        self._thread.start()

    # ---- client side ---------------------------------------------------------------------------
    def submit(self, make_steps: Callable[[], Steps], controls: Controls) -> Future:
        if self._closed.is_set():
            raise SchedulerClosed("the LLM scheduler is shutting down")
        fut: Future = Future()
        self._incoming.put(_Request(make_steps, controls, fut))
        return fut

    def understand(self, items, params=None, think=False, controls: Controls | None = None,
                   base: CFGContexts | None = None) -> Future:
        """A Future of the engine's Turn; `base`: a conversation's contexts to continue from."""
        controls = controls or Controls()
        return self.submit(lambda: self.engine.understand_steps(items, params, think, controls, base), controls)

    def generate_image(self, items, params, think=False, think_params=None, controls: Controls | None = None,
                       base: CFGContexts | None = None) -> Future:
        controls = controls or Controls()
        return self.submit(
            lambda: self.engine.generate_image_steps(items, params, think, think_params, controls, base), controls)

    @property
    def queue_depth(self) -> int:
        return self._incoming.qsize()

    @property
    def active(self) -> int:
        return len(self._active)

    def shutdown(self, cancel: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; cancel (or finish) those in flight; wait for the loop to end."""
        self._closed.set()
        if cancel:
            for r in list(self._active) + list(self._incoming.queue):
                r.controls.cancel.set()
        self._incoming.put(None)  # wake the loop
        self._thread.join(timeout)

    # ---- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not (self._closed.is_set() and not self._active and self._incoming.empty()):
            self._admit(block=not self._active)
            if not self._active:
                continue
            batch = self._pick_batch()
            # Invariant mode: every request of the iteration alone, in the same call a solo run makes.
            for group in ([r] for r in batch) if self.batch_invariant else [batch]:
                self._run(group)
            # round robin: requests left out of this batch go first next time
            self._active = [r for r in self._active if r not in batch] + [r for r in batch if r in self._active]

    def _run(self, group: list[_Request]) -> None:
        """One forward of units (per unit kind) for the requests of `group`, then advance each of them."""
        try:
            results = self.engine.run_units([r.unit for r in group])
        except Exception as e:  # a failed forward fails the requests in it, not the server
            log.exception("batched step failed")
            for r in group:
                self._finish(r, error=e)
            return
        if self.on_batch is not None:
            self.on_batch(len(group))
        for r, result in zip(group, results):
            self._advance(r, result)

    def _admit(self, block: bool) -> None:
        """Start newly submitted requests (their context building runs here)."""
        while True:
            try:
                r = self._incoming.get(timeout=0.1) if block else self._incoming.get_nowait()
            except queue.Empty:
                return
            block = False
            if r is None or not r.future.set_running_or_notify_cancel():
                continue
            r.steps = r.make_steps()
            self._advance(r, None, first=True)

    def _pick_batch(self) -> list[_Request]:
        batch, tokens = [], 0
        for r in self._active:
            n = unit_tokens(r.unit)
            if batch and tokens + n > self.max_batch_tokens:
                break
            batch.append(r)
            tokens += n
        return batch

    def _advance(self, r: _Request, result, first: bool = False) -> None:
        try:
            r.unit = next(r.steps) if first else r.steps.send(result)
        except StopIteration as stop:
            self._finish(r, value=stop.value)
            return
        except BaseException as e:  # Cancelled, InputError, KVCacheFull...: the request's own failure
            self._finish(r, error=e)
            return
        if first:
            self._active.append(r)

    def _finish(self, r: _Request, value=None, error: BaseException | None = None) -> None:
        if r in self._active:
            self._active.remove(r)
        if error is not None:
            if r.steps is not None:
                r.steps.close()  # frees the request's contexts if it still holds any
            if not isinstance(error, Cancelled):
                log.info("request failed: %s", error)
            r.future.set_exception(error)
        else:
            r.future.set_result(value)
