"""OpenAI's error shape, for the OpenAI-compatible paths: `{"error": {"message", "type", "param", "code"}}`,
so the official SDKs raise their own exception classes (BadRequestError, AuthenticationError, ...)."""

from __future__ import annotations

OPENAI_PREFIXES = ("/v1/images/", "/v1/chat/", "/v1/models")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 499: "request_cancelled", 504: "timeout_error"}


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


def openai_error(code: str, message: str, status: int, param: str | None = None) -> dict:
    """`code` is the gRPC status name the job API would give (lower-cased here, as OpenAI's codes are)."""
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code.lower()}}
