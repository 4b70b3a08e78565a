"""The gRPC server scaffold shared by the model services, one concern per module:

    options       ServerOptions (the CLI flags)
    server        ModelServer: port, TLS, interceptors, health, reflection, lifecycle and shutdown
    interceptors  request id + metrics + logs, bearer auth, concurrency limit, exception -> status
    errors        the exception -> status table
    health        grpc.health.v1 wiring          reflection  server reflection wiring
    engine_slot   the engine, loaded later, used one request at a time
    deadlines     deadline / cancellation checks between steps
    payloads      images and tensors in messages and object storage
    metrics       Prometheus registry and /metrics port          logs  JSON logs with request ids
"""

from services.common.rpc.options import ServerOptions
from services.common.rpc.server import ModelServer, State

__all__ = ["ModelServer", "ServerOptions", "State"]
