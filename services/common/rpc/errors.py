"""Which exception becomes which gRPC status. One table, used by the error interceptor for every RPC."""

from __future__ import annotations

import grpc
import redis
import torch

from services.common.images import ImageError
from services.common.storage import (BadObjectKey, BucketNotAllowed, ObjectNotFound, StorageError,
                                     StorageNotConfigured)
from services.common.tensor_codec import TensorCodecError
from services.llm.engine import Cancelled, InputError
from services.llm.kv_cache import KVCacheFull
from services.llm.scheduler import SchedulerClosed
from services.llm.sessions import SessionBusy, SessionNotFound, TooManySessions
from services.orchestrator.jobs import JobNotFound, NoOutput, QueueFull


class NotReady(RuntimeError):
    """The model is still loading, or the server is shutting down."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed between two steps."""


class ModelNotFound(LookupError):
    """A KServe request named a model this server does not serve."""


class TooLarge(ValueError):
    """A request is over a server limit (too many images, too many patches)."""


# First match wins: specific classes before their bases (ObjectNotFound is a StorageError, every
# input error is a ValueError).
STATUS_TABLE: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (ObjectNotFound, grpc.StatusCode.NOT_FOUND),
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (JobNotFound, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NoOutput, grpc.StatusCode.FAILED_PRECONDITION),
    (redis.ConnectionError, grpc.StatusCode.UNAVAILABLE),
    # A busy session is a conflict that clears when the other turn ends: ABORTED (retry the turn).
    (SessionBusy, grpc.StatusCode.ABORTED),
    (TooManySessions, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (KVCacheFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SchedulerClosed, grpc.StatusCode.UNAVAILABLE),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (StorageNotConfigured, grpc.StatusCode.FAILED_PRECONDITION),
    (BucketNotAllowed, grpc.StatusCode.PERMISSION_DENIED),
    (StorageError, grpc.StatusCode.UNAVAILABLE),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (torch.OutOfMemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooLarge, grpc.StatusCode.INVALID_ARGUMENT),
    (ImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (TensorCodecError, grpc.StatusCode.INVALID_ARGUMENT),
    (BadObjectKey, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status for an exception; INTERNAL for anything unexpected (its message is not sent)."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
