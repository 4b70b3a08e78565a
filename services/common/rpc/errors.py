"""Which exception becomes which gRPC status: read from the error's own declaration
(services/common/contracts/errors.py), for the error interceptor of every RPC."""

from __future__ import annotations

import grpc

from services.common.contracts import grpc_code_of


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status for an exception; INTERNAL for anything unexpected (its message is not sent)."""
    return grpc.StatusCode[grpc_code_of(exc)]
