"""The error hierarchy every role shares. Each class declares, once, the gRPC status and the HTTP code it
stands for; the gRPC error interceptor, the job failure record and the HTTP layer all read that
declaration (`grpc_code_of`, `http_status_of`), so a rule never has to be repeated in three tables.

The category classes (InputError, NotFound, ...) are what modules subclass for their own errors
(`ObjectNotFound(NotFound)`, `KVCacheFull(ResourceExhausted)`); the named ones below are the errors
several roles raise or catch, so they live here rather than in one service.
"""

from __future__ import annotations

import sys
from typing import ClassVar


class ServiceError(Exception):
    """Base of every error that says what went wrong in the caller's terms. Not raised itself."""

    grpc_code: ClassVar[str] = "INTERNAL"  # a grpc.StatusCode name; also the job failure code
    http_status: ClassVar[int] = 500


# ---- categories ------------------------------------------------------------------------------------
class InputError(ServiceError, ValueError):
    """The request is invalid (out-of-range parameter, over-long prompt...): the caller's fault."""

    grpc_code, http_status = "INVALID_ARGUMENT", 400


class TooLarge(InputError):
    """A request, body or upload is over a limit (too many images, too many patches, too many bytes)."""

    http_status = 413


class UnsupportedMediaType(InputError):
    """A body in a format the endpoint does not read (neither JSON nor multipart/form-data)."""

    http_status = 415


class NotFound(ServiceError, LookupError):
    grpc_code, http_status = "NOT_FOUND", 404

    def __str__(self) -> str:  # LookupError subclasses such as KeyError quote their message; this does not
        return str(self.args[0]) if self.args else "not found"


class Conflict(ServiceError):
    """Clears when another request ends: retry."""

    grpc_code, http_status = "ABORTED", 409


class FailedPrecondition(ServiceError):
    """The system is not in a state where this request can work (no output yet, no storage configured)."""

    grpc_code, http_status = "FAILED_PRECONDITION", 409


class PermissionDenied(ServiceError):
    grpc_code, http_status = "PERMISSION_DENIED", 403


class ResourceExhausted(ServiceError):
    """A bounded resource is full (queue, sessions, KV cache): retry later."""

    grpc_code, http_status = "RESOURCE_EXHAUSTED", 429


class Unavailable(ServiceError):
    """A dependency or the server itself is briefly away (loading, draining, restarting): retry."""

    grpc_code, http_status = "UNAVAILABLE", 503


class Cancelled(ServiceError):
    """The request was cancelled between two steps."""

    grpc_code, http_status = "CANCELLED", 499  # 499: client closed request (nginx's convention)


class DeadlineExceeded(ServiceError):
    """The request's deadline passed between two steps."""

    grpc_code, http_status = "DEADLINE_EXCEEDED", 504


# ---- the errors several roles share ----------------------------------------------------------------
class NotReady(Unavailable):
    """The model is still loading, or the server is shutting down."""


class ModelNotFound(NotFound):
    """A KServe request named a model this server does not serve."""


class SessionNotFound(NotFound):
    """No session with this id (never created, deleted, or expired)."""


class SessionLost(FailedPrecondition):
    """A turn continues a session the server does not have (expired, deleted, or lost in a restart): run
    without its context it would answer as if the conversation were new, so it is refused instead."""


class SessionBusy(Conflict):
    """The session is serving another request; turns of one conversation are sequential."""


class TooManySessions(ResourceExhausted):
    """The server keeps at most `max_sessions` sessions."""


class JobNotFound(NotFound):
    """No job with this id (never submitted, or its record expired)."""


class QueueFull(ResourceExhausted):
    """The gateway takes no more jobs until the queue drains."""


class NoOutput(FailedPrecondition):
    """The job has no output (yet, or of this kind)."""


# ---- the one lookup ----------------------------------------------------------------------------------
# gRPC code -> HTTP code for errors that declare nothing themselves (a library's exceptions).
HTTP_FOR_CODE = {
    "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "ABORTED": 409, "FAILED_PRECONDITION": 409, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}


def _foreign_code(exc: BaseException) -> str | None:
    """Other libraries' exceptions that mean something to a caller. Looked up only when their library is
    loaded: a process that never imported torch or redis cannot be holding one of their errors, and the
    roles that do not use them must not import them just to ask."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return "RESOURCE_EXHAUSTED"
    redis = sys.modules.get("redis")
    if redis is not None and isinstance(exc, redis.ConnectionError):
        return "UNAVAILABLE"
    return None


def grpc_code_of(exc: BaseException) -> str:
    """The gRPC status name for an exception; INTERNAL for anything unexpected (its message is not sent).
    A plain ValueError (a library refusing a value we passed on from the request) is INVALID_ARGUMENT."""
    if isinstance(exc, ServiceError):
        return exc.grpc_code
    foreign = _foreign_code(exc)
    if foreign is not None:
        return foreign
    if isinstance(exc, ValueError):
        return "INVALID_ARGUMENT"
    return "INTERNAL"


def http_status_of(exc: BaseException) -> int:
    if isinstance(exc, ServiceError):
        return exc.http_status
    return HTTP_FOR_CODE.get(grpc_code_of(exc), 500)
