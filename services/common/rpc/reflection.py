"""Server reflection, so grpcurl and friends can list and call the services without the .proto files."""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection


def enable_reflection(server: grpc.Server, services: list[str]) -> None:
    reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], server)
