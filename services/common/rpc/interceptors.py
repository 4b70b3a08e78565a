"""The policies every RPC passes through, outermost first:

    Observe      request id, metrics by method and code, one JSON log line per RPC
    Auth         `authorization: Bearer <token>` (health checks exempt) -> UNAUTHENTICATED
    Limit        at most N admitted RPCs (cheap probes exempt) -> RESOURCE_EXHAUSTED beyond
    Errors       engine/input exceptions -> a gRPC status with a readable message (errors.STATUS_TABLE);
                 a request body that does not parse as the method's message -> INVALID_ARGUMENT

Each wraps the method's behaviour in a guard (a context manager around the call, or around the whole
iteration for streaming responses), so servicers stay free of this plumbing.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
from contextlib import contextmanager
from typing import Callable, ContextManager

import grpc

from services.common.contracts import InputError
from services.common.rpc.deadlines import time_remaining
from services.common.rpc.errors import status_for
from services.common.rpc.logs import (REQUEST_ID_KEY, current_request_id, new_request_id, reset_request_id,
                                      set_request_id, valid_request_id)
from services.common.rpc.metrics import Metrics

log = logging.getLogger("bagel.rpc")

HEALTH_PREFIX = "/grpc.health.v1."
REFLECTION_PREFIX = "/grpc.reflection."
_KSERVE = "/inference.GRPCInferenceService/"
# Answered from memory in microseconds: never worth refusing for load.
CHEAP_METHODS = (HEALTH_PREFIX, REFLECTION_PREFIX, _KSERVE + "ServerLive", _KSERVE + "ServerReady",
                 _KSERVE + "ModelReady", _KSERVE + "ServerMetadata", _KSERVE + "ModelMetadata")

Guard = Callable[[grpc.ServicerContext], ContextManager[None]]
# A default object repr's address ("<_io.BytesIO object at 0x7f3a...>"): it tells a client about our heap.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def client_message(text: str) -> str:
    """An error message fit to send: object addresses removed (a backstop; messages should not carry them)."""
    return _ADDRESS.sub("", text)


def wrap(handler: grpc.RpcMethodHandler | None, guard: Guard) -> grpc.RpcMethodHandler | None:
    """The same handler with every call run inside guard(context)."""
    if handler is None:
        return None

    def unary(behavior):
        def run(request, context):
            with guard(context):
                return behavior(request, context)
        return run

    def streaming(behavior):
        def run(request, context):
            with guard(context):
                yield from behavior(request, context)
        return run

    return rebuild_handler(handler, lambda behavior, streams: streaming(behavior) if streams else unary(behavior))


_HANDLER_FACTORIES = (("unary_unary", grpc.unary_unary_rpc_method_handler),
                      ("unary_stream", grpc.unary_stream_rpc_method_handler),
                      ("stream_unary", grpc.stream_unary_rpc_method_handler),
                      ("stream_stream", grpc.stream_stream_rpc_method_handler))


def rebuild_handler(handler: grpc.RpcMethodHandler, change, request_deserializer=None) -> grpc.RpcMethodHandler:
    """The same method handler with its behavior passed through change(behavior, streams_responses)."""
    kw = dict(request_deserializer=request_deserializer or handler.request_deserializer,
              response_serializer=handler.response_serializer)
    for kind, factory in _HANDLER_FACTORIES:
        behavior = getattr(handler, kind)
        if behavior:
            return factory(change(behavior, kind.endswith("_stream")), **kw)
    raise ValueError("a method handler without a behavior")


def split_method(full: str) -> tuple[str, str]:
    """"/bagel.v1.ViTService/Encode" -> ("bagel.v1.ViTService", "Encode")."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


def _unset_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The code of an RPC that raised without setting one. Once an RPC is over, gRPC stops reading a
    streaming handler (GeneratorExit), whether the client cancelled or its deadline passed: only the
    deadline tells the two apart."""
    if context.is_active():
        return grpc.StatusCode.UNKNOWN
    left = time_remaining(context)
    return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED


class ObserveInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        service, method = split_method(details.method)
        given = dict(details.invocation_metadata or ()).get(REQUEST_ID_KEY)
        quiet = details.method.startswith((HEALTH_PREFIX, REFLECTION_PREFIX))  # probes: debug level
        m = self.metrics

        @contextmanager
        def guard(context):
            rid = given if given and valid_request_id(given) else new_request_id()
            token = set_request_id(rid)
            start = time.perf_counter()
            m.in_flight.labels(service, method).inc()
            code = grpc.StatusCode.UNKNOWN
            try:
                context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
                if given is not None and rid != given:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{REQUEST_ID_KEY} must be 1-128 characters "
                                  "of [A-Za-z0-9._-] starting with a letter or digit")
                yield
                code = context.code() or grpc.StatusCode.OK
            except BaseException:
                code = context.code() or _unset_code(context)
                raise
            finally:
                elapsed = time.perf_counter() - start
                m.in_flight.labels(service, method).dec()
                m.requests.labels(service, method, code.name).inc()
                m.latency.labels(service, method, code.name).observe(elapsed)
                level = logging.DEBUG if quiet and code == grpc.StatusCode.OK else logging.INFO
                log.log(level, "rpc", extra={"request_id": rid, "rpc": details.method, "code": code.name,
                                             "ms": round(elapsed * 1e3, 2), "peer": context.peer(),
                                             "details": context.details() or ""})
                reset_request_id(token)

        return wrap(handler, guard)


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str, exempt: tuple[str, ...] = (HEALTH_PREFIX,)):
        self._token, self._exempt = token.encode(), exempt

    def _allowed(self, metadata) -> str | None:
        """None when allowed, else why not."""
        value = dict(metadata or ()).get("authorization")
        if value is None:
            return "missing `authorization: Bearer <token>` metadata"
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            return "invalid bearer token"
        return None

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if details.method.startswith(self._exempt):
            return handler
        reason = self._allowed(details.invocation_metadata)
        if reason is None:
            return handler

        @contextmanager
        def deny(context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
            yield  # not reached

        return wrap(handler, deny)


class LimitInterceptor(grpc.ServerInterceptor):
    def __init__(self, limit: int, exempt: tuple[str, ...] = CHEAP_METHODS):
        self.limit, self._exempt = limit, exempt
        self._slots = threading.BoundedSemaphore(limit)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if details.method.startswith(self._exempt):
            return handler

        @contextmanager
        def admit(context):
            if not self._slots.acquire(blocking=False):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is serving its limit of "
                              f"{self.limit} concurrent requests; retry with backoff")
            try:
                yield
            finally:
                self._slots.release()

        return wrap(handler, admit)


class MalformedRequest(InputError):
    """The request's bytes are not a valid message of the method's request type."""


class _Undecodable:
    """What the tolerant deserializer hands on in place of a request it could not parse."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserialize):
    # gRPC deserializes before any handler runs and answers INTERNAL when the deserializer raises, so the
    # failure is passed on as a value and refused inside the interceptors (logged, counted, INVALID_ARGUMENT).
    if deserialize is None:
        return None

    def run(data):
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError, or whatever a custom deserializer raises
            return _Undecodable(e)
    return run


def refuse_undecodable(handler: grpc.RpcMethodHandler | None, method: str) -> grpc.RpcMethodHandler | None:
    """The same handler, raising MalformedRequest (INVALID_ARGUMENT) for a request body that does not parse."""
    if handler is None or handler.request_deserializer is None:
        return handler

    def check(request):
        if isinstance(request, _Undecodable):
            raise MalformedRequest(f"the request body is not a valid message for {method}: {request.error}")
        return request

    def checked(behavior):
        if handler.request_streaming:
            return lambda requests, context: behavior((check(r) for r in requests), context)
        return lambda request, context: behavior(check(request), context)

    return rebuild_handler(handler, lambda behavior, streams: checked(behavior),
                           request_deserializer=_tolerant(handler.request_deserializer))


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, details):
        handler = refuse_undecodable(continuation(details), details.method)

        @contextmanager
        def translate(context):
            try:
                yield
            except Exception as e:
                if context.code() not in (None, grpc.StatusCode.OK):
                    raise  # the servicer aborted with a status of its own
                code = status_for(e)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("unexpected error in %s", details.method)
                    message = f"internal error (request id {current_request_id()})"
                else:
                    message = client_message(str(e) or type(e).__name__)
                context.abort(code, message)

        return wrap(handler, translate)
