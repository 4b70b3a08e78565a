"""grpc.health.v1 for a model server: NOT_SERVING until the weights are loaded and from the start of a
drain on; SERVING in between. The overall status ("") and each service's follow the same state."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health.SERVICE_NAME  # "grpc.health.v1.Health"


class Health:
    def __init__(self, server: grpc.Server, services: list[str]):
        self.services = ["", *services]
        self.servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self._set(NOT_SERVING)

    def _set(self, status) -> None:
        for name in self.services:
            self.servicer.set(name, status)

    def serving(self) -> None:
        self._set(SERVING)

    def shutting_down(self) -> None:
        # Marks everything NOT_SERVING and ignores later set() calls: nothing can flip it back.
        self.servicer.enter_graceful_shutdown()
