"""gRPC glue for the LLM: bagel.v1.LLMService (GenerateText, GenerateImage, DeleteSession).

Every request is submitted to one Scheduler, whose thread owns the engine and runs the steps of all
concurrent requests in shared forwards (step-level batching), or each request's in forwards of its
own with BAGEL_LLM_BATCH_INVARIANT. The servicer only translates messages
(services/llm/convert.py), submits, and relays progress: the engine reports it on the scheduler's
thread, a queue hands it to the RPC's thread, which streams it. When an RPC ends early (client
cancel, deadline, shutdown) the request's cancel flag is set and the scheduler drops it at its next
step, freeing its KV blocks. Sessions keep a conversation's three CFG contexts between calls.

Configuration beyond the common flags comes from the environment: `LLMSettings` below.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterator

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.checkpoint import Checkpoint
from services.common.config import BagelConfig
from services.common.protos import common_pb2, llm_pb2, llm_pb2_grpc, service_name
from services.common.rpc import ModelServer, ServerOptions
from services.common.rpc.deadlines import cancel_event, check_active, time_remaining
from services.common.contracts import (ANSWER_TOKENS, MAX_SESSION_ID, MAX_SESSION_TTL_S, Cancelled, Controls,
                                       DeadlineExceeded, InputError, messages, NotReady, Progress, SessionNotFound,
                                       THINK_TOKENS)
from services.common.rpc.payloads import OBJECT, BOTH, Payloads
from services.common.settings import EnvSettings, setting
from services.common.storage import ObjectStore, check_output_key, digest
from services.llm import convert
from services.attention import get_backend
from services.llm.engine import CFGContexts, LLMEngine
from services.llm.model import load_llm
from services.llm.scheduler import Scheduler
from services.llm.sessions import Session, SessionStore

log = logging.getLogger("bagel.llm")

NAME = "llm"
LLM_SERVICE = service_name(llm_pb2, "LLMService")
EXPIRY_INTERVAL_S = 30.0   # how often idle sessions are swept (acquire() also sweeps)
RUNTIME_STOP_S = 10.0      # after the gRPC grace period: time for the scheduler to drop what is left


@dataclass(frozen=True)
class LLMSettings(EnvSettings):
    """From the environment; arguments given to build_server() and load_engine() take precedence."""
    kv_cache_tokens: int = setting("BAGEL_KV_CACHE_TOKENS", 65536, low=1)  # paged KV cache size in tokens
    max_batch_tokens: int = setting("BAGEL_MAX_BATCH_TOKENS", 32768, low=1)  # query tokens per scheduler iteration
    # idle time before a session is freed, unless the request sets one
    session_ttl_s: int = setting("BAGEL_SESSION_TTL_SECONDS", 600, low=1)
    max_sessions: int = setting("BAGEL_MAX_SESSIONS", 64, low=1)  # more get RESOURCE_EXHAUSTED
    # each request's steps in forwards of its own: results bit-identical to a solo run, at a throughput
    # cost (off by default: shared forwards; see Scheduler)
    batch_invariant: bool = setting("BAGEL_LLM_BATCH_INVARIANT", False)


# ---- metrics -------------------------------------------------------------------------------------
class LLMMetrics:
    """The LLM's own series, in the server's registry next to the RPC ones."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.batch = Histogram("bagel_llm_batch_requests", "requests sharing one scheduler iteration (their steps "
                               "run in the same forwards)", buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self.active = Gauge("bagel_llm_active_requests", "requests the scheduler is running", registry=r)
        self.denoise_steps = Counter("bagel_llm_denoise_steps", "denoising steps done; rate() = steps per second",
                                     registry=r)
        self.tokens = Counter("bagel_llm_decoded_tokens", "text tokens decoded (thinking and answers)", registry=r)
        self.kv_blocks = Gauge("bagel_llm_kv_blocks_in_use", "paged KV cache blocks held by requests and sessions",
                               registry=r)
        self.kv_blocks_total = Gauge("bagel_llm_kv_blocks_total", "paged KV cache blocks in all", registry=r)
        self.sessions = Gauge("bagel_llm_sessions", "sessions kept", registry=r)

    def watch(self, runtime: "LLMRuntime", queue_depth: Gauge) -> None:
        """Gauges read at scrape time, so they are never stale."""
        sched, cache = runtime.scheduler, runtime.engine.cache
        queue_depth.set_function(lambda: sched.queue_depth)
        self.active.set_function(lambda: sched.active)
        self.kv_blocks.set_function(lambda: cache.blocks_in_use)
        self.kv_blocks_total.set(cache.num_blocks)
        self.sessions.set_function(lambda: len(runtime.sessions))

    def count(self, p: Progress) -> None:
        (self.denoise_steps if p.stage == "denoise" else self.tokens).inc()


# ---- what requests run on, once the weights are loaded ---------------------------------------------
class LLMRuntime:
    """The scheduler (the only user of the engine) and the session store, with a periodic expiry sweep."""

    def __init__(self, engine: LLMEngine, metrics: LLMMetrics, session_ttl_s: float, max_sessions: int,
                 max_batch_tokens: int, batch_invariant: bool = False):
        self.engine = engine
        self.scheduler = Scheduler(engine, max_batch_tokens=max_batch_tokens, on_batch=metrics.batch.observe,
                                   batch_invariant=batch_invariant)
        self.sessions = SessionStore(engine, default_ttl_s=session_ttl_s, max_sessions=max_sessions)
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="llm-session-expiry", daemon=True)
        self._sweeper.start()

    def _sweep(self) -> None:
        while not self._stop.wait(EXPIRY_INTERVAL_S):
            if n := self.sessions.expire():
                log.info("sessions expired", extra={"count": n})

    def shutdown(self, timeout: float) -> None:
        """Cancel what is still running (it stops at its next step) and free every session."""
        self._stop.set()
        self.scheduler.shutdown(cancel=True, timeout=timeout)
        self.sessions.close()


class LLMServer(ModelServer):
    """A ModelServer whose engine is driven by an LLMRuntime, started with the weights and stopped after
    the gRPC grace period."""

    def __init__(self, options: ServerOptions, session_ttl_s: float, max_sessions: int, max_batch_tokens: int,
                 batch_invariant: bool = False):
        super().__init__(NAME, options)
        self.llm_metrics = LLMMetrics(self.metrics.registry)
        self.runtime: LLMRuntime | None = None
        self._runtime_args = (session_ttl_s, max_sessions, max_batch_tokens, batch_invariant)

    def load(self, loader: Callable[[], object]) -> None:
        def load_and_start():
            engine = loader()
            self.runtime = LLMRuntime(engine, self.llm_metrics, *self._runtime_args)
            self.llm_metrics.watch(self.runtime, self.metrics.queue_depth)
            return engine

        super().load(load_and_start)
        if not self.slot.loaded and self.runtime is not None:  # stopped while loading: never served
            self.runtime.shutdown(timeout=RUNTIME_STOP_S)

    def stop(self, grace: float | None = None, drain_seconds: float | None = None) -> None:
        # In-flight RPCs get the grace period; at its end gRPC cancels them, which sets their requests'
        # cancel flags. The runtime then drops anything left and frees every session.
        super().stop(grace, drain_seconds)
        if self.runtime is not None:
            self.runtime.shutdown(timeout=RUNTIME_STOP_S)


# ---- progress: scheduler thread -> RPC thread -------------------------------------------------------
_DONE = object()
_POLL_S = 0.5


class Relay:
    """One request's Controls: progress callbacks queue events for the RPC's thread, and the RPC's end
    (cancel, deadline, disconnect) sets the cancel flag the scheduler checks between steps."""

    def __init__(self, context: grpc.ServicerContext, metrics: LLMMetrics):
        self.context, self.metrics = context, metrics
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.controls = Controls(on_progress=self._report, cancel=cancel_event(context))

    def _report(self, p: Progress) -> None:  # on the scheduler thread: must never block
        self.metrics.count(p)
        self._events.put(p)

    def follow(self, fut: Future) -> Iterator[Progress]:
        """The request's progress as it comes, until the request ends (then call result())."""
        fut.add_done_callback(lambda _: self._events.put(_DONE))
        try:
            while True:
                for p in self._next_events():
                    if p is _DONE:
                        return
                    yield p
        finally:
            if not fut.done():  # the RPC is gone: stop the work at its next step
                self.controls.cancel.set()

    def _next_events(self) -> list:
        """The events queued so far (waiting for one), with runs of text progress cut to their last:
        each carries the whole text so far, so the last says everything the others did."""
        while True:
            try:
                events = [self._events.get(timeout=_POLL_S)]
                break
            except queue.Empty:
                if not self.context.is_active():  # don't hold an RPC thread for a caller that left
                    self._raise_ended()
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        return [e for e, nxt in zip(events, events[1:] + [None])
                if not (_is_text(e) and _is_text(nxt) and e.stage == nxt.stage)]

    def result(self, fut: Future):
        try:
            return fut.result()
        except Cancelled:
            self._raise_ended()
            raise

    def _raise_ended(self) -> None:
        left = time_remaining(self.context)
        if left is not None and left <= 0:
            raise DeadlineExceeded("the deadline passed before the generation was done") from None
        raise Cancelled("the request was cancelled")


def _is_text(e) -> bool:
    return isinstance(e, Progress) and e.stage != "denoise"


# ---- the servicer --------------------------------------------------------------------------------
class LLMServicer(llm_pb2_grpc.LLMServiceServicer):
    def __init__(self, server: LLMServer, cfg: BagelConfig, payloads: Payloads):
        self.server, self.cfg, self.payloads = server, cfg, payloads
        self.metrics = server.llm_metrics
        self.max_images = server.options.max_images_per_request

    def GenerateText(self, request, context):
        rt = self._runtime()
        items = self._items(request.items)
        params = messages.text_params(request.params, THINK_TOKENS if request.think else ANSWER_TOKENS)
        relay = Relay(context, self.metrics)
        session = self._acquire(rt, request.session)
        fut = self._submit(rt, session, lambda base: rt.scheduler.understand(
            items, params, request.think, relay.controls, base), context)
        # Think mode decodes reasoning and answer in one go: the text before </think> is THINK.
        deltas = convert.TextDeltas(convert.ANSWER, split_think=request.think)
        for p in relay.follow(fut):
            for d in deltas.update(p):
                yield llm_pb2.GenerateTextEvent(delta=d)
        result = relay.result(fut).result
        for d in deltas.finish():
            yield llm_pb2.GenerateTextEvent(delta=d)
        yield llm_pb2.GenerateTextEvent(done=llm_pb2.TextDone(
            text=result.text, think=result.think or "", tokens=result.tokens, session_id=request.session.id))

    def GenerateImage(self, request, context):
        rt = self._runtime()
        items = self._items(request.items)
        noise = self.payloads.source(request.params.noise, "params.noise") \
            if request.params.HasField("noise") else None
        params = convert.image_params(request.params, items, self.cfg, noise)
        think_params = messages.text_params(request.think_params, THINK_TOKENS)
        delivery = self.payloads.delivery(request.delivery)  # refuses object delivery without storage
        if request.output_key:
            check_output_key(request.output_key, request.job_id)  # a bad key fails now, not after the generation
        relay = Relay(context, self.metrics)
        session = self._acquire(rt, request.session)
        turn = f"{session.id}#{session.turns}" if session is not None else ""
        fut = self._submit(rt, session, lambda base: rt.scheduler.generate_image(
            items, params, request.think, think_params, relay.controls, base), context)
        plan = convert.TextDeltas(convert.THINK)
        for p in relay.follow(fut):
            if p.stage == "denoise":
                yield llm_pb2.GenerateImageEvent(progress=llm_pb2.DenoiseProgress(step=p.step, total=p.total))
            else:
                for d in plan.update(p):
                    yield llm_pb2.GenerateImageEvent(think=d)
        result = relay.result(fut).result
        # Same request in the same job (and turn of the same session) -> same key: a retry overwrites.
        key = self.payloads.key(request.output_key, "latents", digest(
            "llm-generate-image", request.SerializeToString(deterministic=True), turn), "safetensors",
            request.job_id) if delivery in (OBJECT, BOTH) else ""
        ref, inline = self.payloads.put_tensor(result.latent, delivery, key, common_pb2.TENSOR_ENCODING_RAW)
        size = messages.latent_size(result.latent.shape, self.cfg.ae.downsample)
        latent = common_pb2.Latent(ref=ref, inline=inline, size=size)
        yield llm_pb2.GenerateImageEvent(done=llm_pb2.ImageDone(
            latent=latent, seed=result.seed or 0, think=result.think or "", session_id=request.session.id))

    def DeleteSession(self, request, context):
        rt = self._runtime()
        try:
            rt.sessions.delete(_session_id(request.session_id))
        except SessionNotFound:
            return llm_pb2.DeleteSessionResponse(deleted=False)
        return llm_pb2.DeleteSessionResponse(deleted=True)

    # ---- helpers ---------------------------------------------------------------------------------
    def _runtime(self) -> LLMRuntime:
        if self.server.runtime is None:
            raise NotReady("the model is still loading; retry shortly")
        return self.server.runtime

    def _items(self, msgs):
        return convert.context_items(msgs, self.cfg, self.payloads.vit_features, self.payloads.latent,
                                     self.max_images)

    def _acquire(self, rt: LLMRuntime, options: llm_pb2.SessionOptions) -> Session | None:
        if not options.id:
            return None
        if options.ttl_seconds > MAX_SESSION_TTL_S:
            raise InputError(f"session.ttl_seconds must be at most {MAX_SESSION_TTL_S}, got {options.ttl_seconds}")
        return rt.sessions.acquire(_session_id(options.id), float(options.ttl_seconds) or None,
                                  resume=options.resume)

    def _submit(self, rt: LLMRuntime, session: Session | None, submit: Callable[[CFGContexts | None], Future],
                context) -> Future:
        """Submit with the session held (the turn starts from its contexts); when the scheduler is done, a
        successful turn's contexts become the session's, and the session is released."""
        try:
            check_active(context)
            fut = submit(session.state if session is not None else None)
        except BaseException:
            if session is not None:
                rt.sessions.release(session)
            raise
        if session is not None:
            def end_turn(f: Future) -> None:
                try:
                    if not f.cancelled() and f.exception() is None:
                        rt.sessions.adopt(session, f.result())
                finally:
                    rt.sessions.release(session)

            fut.add_done_callback(end_turn)
        return fut


def _session_id(value: str) -> str:
    if not value or len(value) > MAX_SESSION_ID or not value.isprintable():
        raise InputError(f"session id must be 1-{MAX_SESSION_ID} printable characters, got {value[:40]!r}")
    return value


def build_server(options: ServerOptions, cfg: BagelConfig, store: ObjectStore | None = None, *,
                 session_ttl_s: float | None = None, max_sessions: int | None = None,
                 max_batch_tokens: int | None = None, batch_invariant: bool | None = None) -> LLMServer:
    """The server, not started; the scheduler and sessions start with the weights (load())."""
    settings = LLMSettings.from_env()
    server = LLMServer(options, session_ttl_s=session_ttl_s or settings.session_ttl_s,
                       max_sessions=max_sessions or settings.max_sessions,
                       max_batch_tokens=max_batch_tokens or settings.max_batch_tokens,
                       batch_invariant=settings.batch_invariant if batch_invariant is None else batch_invariant)
    servicer = LLMServicer(server, cfg, Payloads(store))
    server.add_service(LLM_SERVICE, lambda s: llm_pb2_grpc.add_LLMServiceServicer_to_server(servicer, s))
    return server


def load_engine(ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype = torch.float32, *,
                kv_cache_tokens: int | None = None, attention: str | None = None) -> LLMEngine:
    """Weights, tokenizer, the attention backend for the device (BAGEL_ATTENTION_BACKEND overrides) and a
    paged KV cache of kv_cache_tokens (default: LLMSettings, from BAGEL_KV_CACHE_TOKENS)."""
    tokens = kv_cache_tokens or LLMSettings.from_env().kv_cache_tokens
    backend = get_backend(attention, device)
    engine = LLMEngine(load_llm(ckpt, dtype=dtype, device=device), ckpt.tokenizer(), attention=backend,
                       kv_cache_tokens=tokens)
    log.info("llm engine loaded", extra={"attention_backend": backend.name, "device": str(device),
                                         "dtype": str(dtype).removeprefix("torch."), "kv_cache_tokens": tokens,
                                         "kv_blocks": engine.cache.num_blocks})
    return engine
