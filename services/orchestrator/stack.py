"""The whole system on one machine, as separate processes on free ports of 127.0.0.1: Redis, an
S3-compatible server, the ViT / VAE / LLM gRPC servers, a Celery worker and the gateway: the same
processes and wiring as the Kubernetes deployment (deploy/k8s/), for the demo and for trying the API.

    with LocalStack(workdir) as stack:        # or: bagel-serve stack
        stack.http_url, stack.grpc_address    # the gateway's job API
        stack.auth_token                      # its bearer token (generated unless given)

Authentication is always on: the gateway and the model servers share one token, random unless given.

A supervisor thread restarts a model server, the worker or the gateway when it exits: same command, same
port (so the others find it again), after a delay that doubles from 0.5 s to 30 s and starts over once the
process has stayed up a minute. It gives up on a process that failed 5 times within a minute and says so
(`stack.gave_up`); the rest keep running. Redis and the S3 server are not restarted: their loss is logged.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.dev.ports import free_port
from services.dev.redis_server import LocalRedis, start_local_redis
from services.dev.s3_server import LocalS3, start_local_s3
from services.orchestrator.settings import OrchestratorSettings

log = logging.getLogger("bagel.stack")
MODEL_SERVERS = ("vit", "vae", "llm")


class StackError(RuntimeError):
    """A process of the stack did not start; the message names it and ends with its log."""


class Restarts:
    """When to restart one supervised process, and when to stop trying."""

    def __init__(self, first_delay: float = 0.5, max_delay: float = 30.0, stable_s: float = 60.0,
                 max_failures: int = 5, window_s: float = 60.0):
        self.first_delay, self.max_delay, self.stable_s = first_delay, max_delay, stable_s
        self.max_failures, self.window_s = max_failures, window_s
        self.delay = first_delay
        self.failures: list[float] = []  # monotonic times of recent exits

    def failed(self, now: float, uptime: float) -> float | None:
        """Record an exit after `uptime` seconds up: the delay before the restart, or None to give up."""
        if uptime >= self.stable_s:
            self.delay = self.first_delay  # it had recovered: a new failure starts the backoff over
        self.failures = [t for t in self.failures if now - t < self.window_s] + [now]
        if len(self.failures) >= self.max_failures:
            return None
        delay, self.delay = self.delay, min(self.delay * 2, self.max_delay)
        return delay


class LocalStack:
    def __init__(self, workdir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
                 worker_concurrency: int = 2, auth_token: str | None = None, bucket: str = "bagel",
                 start_timeout: float = 180.0, restarts=Restarts):
        self.workdir = Path(workdir)
        self.checkpoint, self.device, self.bucket = checkpoint, device, bucket
        self.worker_concurrency, self.start_timeout = worker_concurrency, start_timeout
        # Even on loopback: any local user or browser page could otherwise call the API.
        self.auth_token = auth_token or secrets.token_urlsafe(32)
        self.redis: LocalRedis | None = None
        self.s3: LocalS3 | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.env: dict[str, str] = {}
        self.commands: dict[str, tuple[str, ...]] = {}   # what _spawn ran, to run it again
        self.started_at: dict[str, float] = {}
        self.restart_count: dict[str, int] = {}
        self.gave_up: dict[str, str] = {}                # process name -> why it is no longer restarted
        self._restarts = restarts                        # a factory of Restarts, one per process
        self._lock = threading.Lock()                    # processes vs. stop()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def start(self) -> "LocalStack":
        from services.dev.default_model import default_checkpoint_dir

        try:
            # Made once here, not by three servers racing to create the embedded default.
            self.checkpoint = str(self.checkpoint or default_checkpoint_dir())
            (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
            self.redis = start_local_redis(self.workdir / "redis")
            self.s3 = start_local_s3(self.workdir / "s3", buckets=(self.bucket,))
            self.ports = {name: free_port() for name in (*MODEL_SERVERS, "http", "grpc")}
            # The gateway is ready only with a worker consuming the queue: here the worker is always part of it.
            settings = OrchestratorSettings(redis_url=self.redis.url, auth_token=self.auth_token,
                                            ready_requires_worker=True,
                                            **{f"{n}_addr": f"127.0.0.1:{self.ports[n]}" for n in MODEL_SERVERS})
            self.env = {**os.environ, **settings.to_env(), **self.s3.config(self.bucket).to_env()}
            for name in MODEL_SERVERS:
                self._spawn(name, "serve", name, "--host", "127.0.0.1", "--port", str(self.ports[name]),
                            "--checkpoint", self.checkpoint, "--device", self.device, "--drain-seconds", "0",
                            "--grace-seconds", "5")
            self._spawn("worker", "worker", "--concurrency", str(self.worker_concurrency))
            self._spawn("gateway", "gateway", "--host", "127.0.0.1", "--http-port", str(self.ports["http"]),
                        "--grpc-port", str(self.ports["grpc"]))
            deadline = time.monotonic() + self.start_timeout
            for name in MODEL_SERVERS:
                self._wait(name, deadline, lambda n=name: _grpc_serving(f"127.0.0.1:{self.ports[n]}"))
            self._wait("gateway", deadline, lambda: _http_ok(self.http_url + "/readyz"))
        except BaseException:
            self.stop()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="stack-supervisor", daemon=True)
        self._supervisor.start()
        log.info("stack up", extra={"http": self.http_url, "grpc": self.grpc_address})
        return self

    def _spawn(self, name: str, *args: str) -> None:
        self.commands[name] = args
        out = open(self.workdir / "logs" / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=self.env,
                                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.started_at[name] = time.monotonic()
        out.close()  # the child holds its own descriptor

    def _supervise(self, poll_s: float = 0.2) -> None:
        """Restart what exits (see the module's docstring) until stop()."""
        policies = {name: self._restarts() for name in self.commands}
        due: dict[str, float] = {}  # process name -> when to start it again
        lost = set()                # Redis / S3 already reported
        while not self._stopping.wait(poll_s):
            now = time.monotonic()
            for label, server in (("redis", self.redis), ("s3", self.s3)):
                proc = getattr(server, "process", None)
                if label not in lost and proc is not None and proc.poll() is not None:
                    lost.add(label)
                    log.error("%s exited with code %s and is not restarted: the stack cannot work without it",
                              label, proc.returncode)
            for name, proc in list(self.processes.items()):
                if name in self.gave_up or name in due or proc.poll() is None:
                    continue
                delay = policies[name].failed(now, now - self.started_at[name])
                tail = self.log_tail(name, 1500)
                if delay is None:
                    policy = policies[name]
                    self.gave_up[name] = (f"exited with code {proc.returncode}, {policy.max_failures} failures "
                                          f"within {policy.window_s:.0f} s")
                    log.error("%s %s: giving up on it (log: %s); its last output:\n%s", name, self.gave_up[name],
                              self.workdir / "logs" / f"{name}.log", tail)
                    continue
                due[name] = now + delay
                log.warning("%s exited with code %s; restarting it in %.1f s; its last output:\n%s",
                            name, proc.returncode, delay, tail)
            for name, when in list(due.items()):
                if now < when:
                    continue
                with self._lock:
                    if self._stopping.is_set():
                        return
                    del due[name]
                    self._spawn(name, *self.commands[name])
                    self.restart_count[name] = self.restart_count.get(name, 0) + 1
                log.warning("%s restarted (pid %d, restart %d)", name, self.processes[name].pid,
                            self.restart_count[name])

    def _wait(self, name: str, deadline: float, ready) -> None:
        proc = self.processes[name]
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with code {proc.returncode}" if proc.poll() is not None else "timed out"
                raise StackError(f"{name} did not become ready ({why}): {self.log_tail(name)}")
            time.sleep(0.2)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        try:
            return (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Gateway and worker first (no new work), then the model servers, then Redis and S3."""
        with self._lock:  # no restart from here on
            self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
        for name in ("gateway", "worker", *MODEL_SERVERS):
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for server in (self.redis, self.s3):
            if server is not None:
                server.stop()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _grpc_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False
