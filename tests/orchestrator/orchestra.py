"""A worker process and a gateway on real ports over the live servers of the test session: the orchestrator
as tests of the job API and the OpenAI-compatible API drive it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import httpx

from services.common.protos import jobs_pb2_grpc
from services.orchestrator.celery_app import make_app
from services.orchestrator.gateway import GatewayProcess, build_gateway
from services.orchestrator.jobs import JobStore
from services.orchestrator.runner import Runtime
from services.orchestrator.settings import OrchestratorSettings
from service_helpers import scrape


def settings_for(redis_server, vit, vae, llm_address, **overrides) -> OrchestratorSettings:
    base = dict(redis_url=redis_server.url, vit_addr=vit.address, vae_addr=vae.address, llm_addr=llm_address,
                lease_s=2, visibility_timeout_s=4, retry_backoff_s=0.2, max_retries=2, call_timeout_s=120)
    return OrchestratorSettings(**{**base, **overrides})


class WorkerProcess:
    """`bagel-serve worker` as its own process, configured through the environment as in a deployment."""

    def __init__(self, settings: OrchestratorSettings, store, concurrency: int = 2):
        import tempfile

        from services.dev.ports import free_port

        self.log = tempfile.TemporaryFile()
        self.metrics_port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "worker", "--concurrency",
                                      str(concurrency), "--log-level", "WARNING", "--metrics-port",
                                      str(self.metrics_port)], env={**os.environ, **settings.to_env(), **store.cfg.to_env()},
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def scrape(self, timeout: float = 60.0) -> str:
        """Its /metrics, waiting for the process to come up (imports take seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return scrape(self.metrics_port)
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "the worker did not come up"
                time.sleep(0.1)

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Orchestrator:
    """A worker process + gateway (in this process, on real ports) on one settings object. The gateway's
    Celery app also gives direct access to a runner (`app.bagel_runtime`)."""

    def __init__(self, settings: OrchestratorSettings, store, worker: bool = True, auth_token: str | None = None):
        self.settings = settings
        self.app = make_app(settings, Runtime(settings, storage=store.cfg))
        self._worker = WorkerProcess(settings, store) if worker else None
        self.gateway = build_gateway(settings, storage=store.cfg, celery=self.app)
        from services.dev.ports import free_port

        self.metrics_port = free_port()
        self.proc = GatewayProcess(self.gateway, host="127.0.0.1", http_port=0, grpc_port=0, auth_token=auth_token,
                                   metrics_port=self.metrics_port)
        self.proc.start()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.proc.http_port}", timeout=120)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.proc.grpc_port}")
        self.stub = jobs_pb2_grpc.JobServiceStub(self.channel)

    @property
    def jobs(self) -> JobStore:
        return self.gateway.jobs

    def close(self) -> None:
        self.http.close()
        self.channel.close()
        self.proc.stop()
        if self._worker is not None:
            self._worker.stop()
