"""The contracts every role shares: request items and parameters, progress and cancellation, results,
and the error hierarchy (each error declares its gRPC status and HTTP code once).

Nothing here imports torch, a model, a service or the orchestrator: the gateway and the worker use these
types as the model services do."""

from services.common.contracts.errors import (HTTP_FOR_CODE, Cancelled, Conflict, DeadlineExceeded,
                                              FailedPrecondition, InputError, JobNotFound, ModelNotFound,
                                              NoOutput, NotFound, NotReady, PermissionDenied, QueueFull,
                                              ResourceExhausted, ServiceError, SessionBusy, SessionLost,
                                              SessionNotFound, TooLarge, TooManySessions, Unavailable,
                                              UnsupportedMediaType,
                                              grpc_code_of, http_status_of)
from services.common.contracts.progress import Controls, Progress
from services.common.contracts.requests import (ANSWER_TOKENS, ContextItem, ImageParams, MAX_NEW_TOKENS,
                                                MAX_SESSION_ID, MAX_SESSION_TTL_S, partial_think_end, RENORM_TYPES,
                                                SessionRef, TextItem, TextParams, THINK_END, THINK_TOKENS,
                                                VAEImageItem, ViTImageItem)
from services.common.contracts.results import ImageResult, UnderstandResult

__all__ = [
    "ANSWER_TOKENS", "MAX_NEW_TOKENS", "MAX_SESSION_ID", "MAX_SESSION_TTL_S", "RENORM_TYPES", "THINK_END",
    "THINK_TOKENS", "HTTP_FOR_CODE", "Cancelled", "Conflict", "ContextItem", "Controls", "DeadlineExceeded",
    "FailedPrecondition", "ImageParams", "ImageResult", "InputError", "JobNotFound", "ModelNotFound", "NoOutput",
    "NotFound", "NotReady", "PermissionDenied", "Progress", "QueueFull", "ResourceExhausted", "ServiceError",
    "SessionBusy", "SessionLost", "SessionNotFound", "SessionRef", "TextItem", "TextParams", "TooLarge",
    "TooManySessions", "Unavailable", "UnderstandResult", "UnsupportedMediaType", "VAEImageItem", "ViTImageItem",
    "grpc_code_of", "http_status_of", "partial_think_end",
]
