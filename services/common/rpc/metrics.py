"""Prometheus metrics of one server, in a registry of its own, served on a separate HTTP port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        # A registry per server (not the global one) so several servers can live in one process.
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("bagel_rpc_requests", "RPCs finished, by method and status code",
                                ["service", "method", "code"], registry=r)
        self.latency = Histogram("bagel_rpc_latency_seconds", "RPC wall time, by method and status code",
                                 ["service", "method", "code"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("bagel_rpc_in_flight", "RPCs being served now", ["service", "method"], registry=r)
        self.queue_depth = Gauge("bagel_engine_queue_depth", "admitted requests waiting for the model",
                                 registry=r)
        self.batch_size = Histogram("bagel_batch_size", "items (images, latents) per model call", ["method"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.ready = Gauge("bagel_model_ready", "1 when the weights are loaded and the server is serving",
                           registry=r)
        self._http = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int | None:
        """Start the /metrics HTTP server; port 0 disables it. Returns the bound port."""
        self._http, bound = serve_registry(self.registry, port, host)
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def serve_registry(registry: CollectorRegistry, port: int, host: str = "127.0.0.1"):
    """/metrics for one registry on its own HTTP port (0: none). Returns (server or None, bound port)."""
    if not port:
        return None, None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
