"""Typed errors of the job API: one class per gRPC status name, built from an HTTP error body
(`{"code", "message"}`), a gRPC status, or a job that ended FAILED / CANCELLED."""

from __future__ import annotations

from typing import Any


class BagelError(Exception):
    """Any error of the job API. `code` is the gRPC status name (INVALID_ARGUMENT, NOT_FOUND, ...), the same
    over HTTP and gRPC; `job` is the ended job when the error is a job's ending, else None."""

    default_code = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None, job: Any = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.job = job

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgument(BagelError, ValueError):
    default_code = "INVALID_ARGUMENT"


class NotFound(BagelError, LookupError):
    default_code = "NOT_FOUND"


class Unauthenticated(BagelError):
    default_code = "UNAUTHENTICATED"


class PermissionDenied(BagelError):
    default_code = "PERMISSION_DENIED"


class FailedPrecondition(BagelError):
    default_code = "FAILED_PRECONDITION"


class ResourceExhausted(BagelError):
    default_code = "RESOURCE_EXHAUSTED"


class Unavailable(BagelError, ConnectionError):
    default_code = "UNAVAILABLE"


class DeadlineExceeded(BagelError, TimeoutError):
    """The call, a wait, or the job's own `deadline_s` ran out."""

    default_code = "DEADLINE_EXCEEDED"


class Cancelled(BagelError):
    """The job was cancelled (by `cancel`, or by a caller that gave up on it)."""

    default_code = "CANCELLED"


class JobFailed(BagelError):
    """A job that ended FAILED: `code` and `message` are the job's error. It is also an instance of the
    status's class, so `except DeadlineExceeded` catches a job stopped by its deadline too."""

    default_code = "INTERNAL"


_BY_CODE: dict[str, type[BagelError]] = {cls.default_code: cls for cls in (
    InvalidArgument, NotFound, Unauthenticated, PermissionDenied, FailedPrecondition, ResourceExhausted,
    Unavailable, DeadlineExceeded, Cancelled)}

# Used only when an HTTP error has no JSON body (a proxy's page, say).
_CODE_BY_HTTP = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "FAILED_PRECONDITION", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                 499: "CANCELLED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

_FAILED: dict[str, type[JobFailed]] = {}


def error_for(code: str, message: str, job: Any = None) -> BagelError:
    """The exception for a status name; unknown names give a plain BagelError carrying the name."""
    return _BY_CODE.get(code, BagelError)(message, code, job)


def job_failed(code: str, message: str, job: Any = None) -> JobFailed:
    """A JobFailed that is also the status's class (made once per code)."""
    cls = _FAILED.get(code)
    if cls is None:
        base = _BY_CODE.get(code)
        cls = JobFailed if base is None else type(f"JobFailed{base.__name__}", (JobFailed, base), {})
        _FAILED[code] = cls
    return cls(message, code or "INTERNAL", job)


def from_http(status: int, body: bytes | str) -> BagelError:
    import json

    try:
        data = json.loads(body)
        code, message = str(data["code"]), str(data.get("message", ""))
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        code, message = _CODE_BY_HTTP.get(status, "UNKNOWN" if status < 500 else "INTERNAL"), text[:500]
    return error_for(code, message or f"HTTP {status}")


def from_grpc(err: Exception) -> BagelError:
    """A grpc.RpcError (sync or aio) as the matching class."""
    try:
        code, details = err.code().name, err.details() or ""  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an RpcError without a status (rare; channel torn down)
        code, details = "UNKNOWN", str(err)
    return error_for(code, details or code)
