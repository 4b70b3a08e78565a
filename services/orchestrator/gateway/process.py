"""The gateway process: both fronts on one Gateway (gRPC on the server scaffold with health, reflection,
auth and metrics; HTTP on uvicorn), built from the settings, and its command line."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time

import uvicorn
from celery import Celery

from services.common.protos import jobs_pb2, jobs_pb2_grpc, service_name
from services.common.rpc import ModelServer, ServerOptions
from services.common.rpc.logs import configure_logging
from services.common.rpc.metrics import Metrics
from services.common.secrets import check_startup
from services.common.storage import ObjectStore, StorageConfig, StorageError
from services.orchestrator.gateway.grpc_api import JobServicer
from services.orchestrator.gateway.http_api import build_http_app
from services.orchestrator.gateway.operations import Gateway
from services.orchestrator.jobs import JobStore
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.tasks import make_celery

log = logging.getLogger("bagel.gateway")


class GatewayProcess:
    """Both fronts on one Gateway: gRPC on the scaffold (health, reflection, auth, metrics), HTTP on uvicorn."""

    def __init__(self, gateway: Gateway, *, host: str = "127.0.0.1", http_port: int = 8080, grpc_port: int = 50050,
                 metrics_port: int = 0, auth_token: str | None = None, max_concurrency: int = 256):
        self.gateway = gateway
        # Every admitted Run / Watch follows its job on a pub/sub connection of the job store's pool.
        gateway.jobs.fit_streams(max_concurrency)
        options = ServerOptions(host=host, port=grpc_port, metrics_port=metrics_port, auth_token=auth_token,
                                max_concurrency=max_concurrency, drain_seconds=0.0, grace_seconds=10.0)
        metrics = Metrics()
        gateway.attach_metrics(metrics.registry)
        self.grpc = ModelServer("gateway", options, metrics)
        # Set first thing in stop(): both fronts end their waits (streams, long polls) without cancelling.
        self.stopping = threading.Event()
        servicer = JobServicer(gateway, self.stopping, auth_token)
        self.grpc.add_service(service_name(jobs_pb2, "JobService"),
                              lambda s: jobs_pb2_grpc.add_JobServiceServicer_to_server(servicer, s))
        self.http_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.http_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this. Without it a response written in two pieces (headers, then
        # body) waits for the client's delayed ACK: ~40 ms on every request (uvicorn sets it only on the
        # sockets it creates itself).
        self.http_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.http_socket.bind((host, http_port))
        self.http_port = self.http_socket.getsockname()[1]
        config = uvicorn.Config(build_http_app(gateway, auth_token, stopping=self.stopping), log_config=None,
                                access_log=False, timeout_graceful_shutdown=10)
        self.http = uvicorn.Server(config)
        self._http_thread: threading.Thread | None = None

    @property
    def grpc_port(self) -> int | None:
        return self.grpc.port

    def start(self) -> None:
        self.grpc.start()
        self.grpc.load(lambda: self.gateway)  # nothing to load: serving at once
        self._http_thread = threading.Thread(target=self.http.run, kwargs={"sockets": [self.http_socket]},
                                             name="gateway-http", daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + 30
        while not self.http.started and self._http_thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.http.started:
            raise OSError("the HTTP server did not start")
        log.info("gateway listening", extra={"http_port": self.http_port, "grpc_port": self.grpc.port})

    def stop(self) -> None:
        """Graceful: waits in progress end at once with the job as it is (jobs run on, on the workers), so
        both servers finish their in-flight calls well within their grace periods."""
        self.stopping.set()
        self.http.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(timeout=15)
        self.grpc.stop()
        self.http_socket.close()

    def wait(self) -> None:
        self.grpc.wait()


def build_gateway(settings: OrchestratorSettings, storage: StorageConfig | None = None,
                  celery: Celery | None = None) -> Gateway:
    storage = storage or StorageConfig.from_env()
    if storage is None:
        raise ValueError("the gateway needs object storage: set BAGEL_S3_ENDPOINT and its credentials")
    if celery is None:
        celery = make_celery(settings)  # sends tasks by name: the worker's implementations are not needed here
    store = ObjectStore(storage)
    return Gateway(JobStore.from_url(settings.redis_url, ttl_seconds=settings.job_ttl_s), store, celery, settings)


def add_gateway_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind, HTTP, gRPC and metrics (default: 127.0.0.1, this machine only; "
                        "0.0.0.0 for all interfaces, as in a container)")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP/JSON job API; 0 picks a free port (logged)")
    p.add_argument("--grpc-port", type=int, default=50050, help="gRPC JobService; 0 picks a free port (logged)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port; 0 disables")
    p.add_argument("--log-level", default="INFO")
    return p


def gateway_from_args(args: argparse.Namespace) -> int:
    """Configuration beyond the flags comes from the environment (settings.py, BAGEL_S3_*)."""
    import signal

    configure_logging(args.log_level)
    try:
        settings = OrchestratorSettings.from_env()
        storage = StorageConfig.from_env()
        # Before connecting to Redis or S3: a placeholder secret never serves.
        check_startup("the gateway", token=settings.auth_token, token_name="BAGEL_AUTH_TOKEN", host=args.host,
                      s3_secret=storage.secret_key if storage else None)
        gateway = build_gateway(settings, storage)
        gateway.store.ensure_bucket()
        proc = GatewayProcess(gateway, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, auth_token=settings.auth_token)
        proc.start()
    except (ValueError, OSError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"gateway http={proc.http_port} grpc={proc.grpc_port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    proc.stop()
    return 0
