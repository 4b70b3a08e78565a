"""A model server: one gRPC port with the model's services, health, reflection and the interceptors,
plus the lifecycle

    CREATED --start()--> LOADING --load()--> SERVING --stop()--> DRAINING --> STOPPED

LOADING and DRAINING report NOT_SERVING on health. stop() first flips health (load balancers and
Kubernetes readiness take the pod out), keeps serving for `drain_seconds`, then stops accepting and
gives in-flight RPCs `grace_seconds` to finish before cancelling them.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable

import grpc

from services.common.rpc.engine_slot import EngineSlot
from services.common.rpc.health import HEALTH_SERVICE, Health
from services.common.rpc.interceptors import AuthInterceptor, ErrorInterceptor, LimitInterceptor, ObserveInterceptor
from services.common.rpc.metrics import Metrics
from services.common.rpc.options import ServerOptions
from services.common.rpc.reflection import enable_reflection

log = logging.getLogger("bagel.server")


class State(enum.Enum):
    CREATED = "created"
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class ModelServer:
    def __init__(self, name: str, options: ServerOptions, metrics: Metrics | None = None):
        self.name, self.options = name, options
        self.metrics = metrics or Metrics()
        self.slot: EngineSlot = EngineSlot(self.metrics.queue_depth)
        self.state = State.CREATED
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._services: list[str] = []
        self._health: Health | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        interceptors = [ObserveInterceptor(self.metrics)]
        if options.auth_token:
            interceptors.append(AuthInterceptor(options.auth_token))
        interceptors += [LimitInterceptor(options.max_concurrency), ErrorInterceptor()]
        size = options.max_message_bytes
        self.grpc = grpc.server(
            # Headroom above the limit: rejections, health checks and metadata calls need threads too.
            futures.ThreadPoolExecutor(max_workers=options.max_concurrency + 8, thread_name_prefix=f"{name}-rpc"),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                     ("grpc.so_reuseport", 0)],  # a second server on a taken port must fail, not share it
        )

    def add_service(self, full_name: str, register: Callable[[grpc.Server], None]) -> None:
        """register(server) adds a servicer, e.g. lambda s: add_ViTServiceServicer_to_server(servicer, s)."""
        if self.state is not State.CREATED:
            raise RuntimeError("services must be added before start()")
        register(self.grpc)
        self._services.append(full_name)

    @property
    def ready(self) -> bool:
        """Weights loaded and not shutting down: what health, ServerReady and ModelReady report."""
        return self.state is State.SERVING

    @property
    def services(self) -> list[str]:
        return list(self._services)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until load()). Returns the bound port."""
        if self.state is not State.CREATED:
            raise RuntimeError(f"start() in state {self.state.value}")
        self._health = Health(self.grpc, self._services)
        enable_reflection(self.grpc, [*self._services, HEALTH_SERVICE])
        address = f"{self.options.host}:{self.options.port}"
        try:
            if self.options.tls_cert:
                creds = grpc.ssl_server_credentials([(Path(self.options.tls_key).read_bytes(),
                                                      Path(self.options.tls_cert).read_bytes())])
                self.port = self.grpc.add_secure_port(address, creds)
            else:
                self.port = self.grpc.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: {e}") from None
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        self.grpc.start()
        try:
            metrics_host = self.options.metrics_host or self.options.host
            self.metrics_port = self.metrics.serve(self.options.metrics_port, metrics_host)
        except OSError as e:
            self.grpc.stop(0)
            raise OSError(f"cannot serve metrics on port {self.options.metrics_port}: {e}") from None
        self.state = State.LOADING
        log.info("listening", extra={"server": self.name, "port": self.port, "tls": bool(self.options.tls_cert),
                                     "metrics_port": self.metrics_port, "services": self._services})
        return self.port

    def load(self, loader: Callable[[], object]) -> None:
        """Load the engine (health stays NOT_SERVING meanwhile), then serve."""
        t0 = time.perf_counter()
        engine = loader()
        with self._lock:
            if self.state is not State.LOADING:
                return  # stopped while loading
            self.slot.set(engine)
            self._health.serving()
            self.metrics.ready.set(1)
            self.state = State.SERVING
        log.info("serving", extra={"server": self.name, "load_s": round(time.perf_counter() - t0, 3)})

    def drain(self) -> None:
        """Health NOT_SERVING for good; RPCs are still served until stop() goes on."""
        with self._lock:
            if self.state in (State.DRAINING, State.STOPPED):
                return
            self.state = State.DRAINING
        if self._health is not None:
            self._health.shutting_down()
        self.metrics.ready.set(0)
        log.info("draining", extra={"server": self.name})

    def stop(self, grace: float | None = None, drain_seconds: float | None = None) -> None:
        """The whole shutdown: drain, wait drain_seconds, stop accepting, give in-flight RPCs `grace`."""
        grace = self.options.grace_seconds if grace is None else grace
        drain_seconds = self.options.drain_seconds if drain_seconds is None else drain_seconds
        if self.state is State.STOPPED:
            return
        was_started = self.state is not State.CREATED
        self.drain()
        if was_started and drain_seconds > 0:
            time.sleep(drain_seconds)
        self.grpc.stop(grace).wait()
        self.metrics.stop()
        with self._lock:
            self.state = State.STOPPED
        self._stopped.set()
        log.info("stopped", extra={"server": self.name})

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() has finished (True) or the timeout passed (False)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "ModelServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=0, drain_seconds=0)
