"""The gateway: the job API product backends call, over gRPC (`bagel.v1.JobService`) and HTTP/JSON.

Accepting a job means: the request is checked (bad input is refused here with INVALID_ARGUMENT / 400,
not turned into a failed job), its input image is stored in the bucket, its record is written to
Redis, and its task is queued. Only then does the client get the job id, so an accepted job survives a
gateway restart. Workers (celery_app.py) run it; the gateway only reads and follows the record.

HTTP (bodies are the protos in protobuf's JSON mapping; `workflow` also takes "generate" etc.):
    POST /v1/jobs[?wait=S]           submit (JSON, or multipart: `request` JSON + `image` file); 202 with
                                     the Job, or 200 with the ended Job within S seconds
    GET  /v1/jobs/{id}[?wait=S]      the Job; with wait, returns as soon as it ends (long poll)
    GET  /v1/jobs/{id}/events        server-sent events: the Job at every change until it ends
    GET  /v1/jobs/{id}/image         the output PNG of a generate / edit job
    POST /v1/jobs/{id}/cancel        cancel; the Job
    DELETE /v1/sessions/{id}         end a conversation now (404 when there is none)
    GET  /healthz                    alive;  GET /readyz: Redis and the bucket reachable
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import socket
import sys
import threading
import time
import uuid
from typing import Iterator

import grpc
import redis
import uvicorn
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile  # what request.form() returns
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from services.common.images import MAX_IMAGE_BYTES
from services.common.protos import jobs_pb2, jobs_pb2_grpc, llm_pb2, service_name
from services.common.rpc import ModelServer, ServerOptions
from services.common.rpc.errors import status_for
from services.common.rpc.logs import configure_logging
from services.common.rpc.metrics import Metrics
from services.common.storage import ObjectStore, StorageConfig, StorageError, job_prefix
from services.llm.engine import InputError
from services.llm.sessions import SessionNotFound
from services.orchestrator.jobs import JobStore, NoOutput, QueueFull, is_terminal
from services.orchestrator.metrics import GatewayMetrics
from services.orchestrator.plan import WORKFLOW_NAMES, check_session_id, plan_job
from services.orchestrator.settings import CONTROL_QUEUE, DELETE_SESSION_TASK, QUEUE, TASK, OrchestratorSettings

log = logging.getLogger("bagel.gateway")

MAX_WAIT_S = 600.0
# A 32 MiB image is ~43 MiB as base64 JSON; everything else in a request is small.
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 1024 * 1024
HTTP_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_SHORT_WORKFLOWS = {"understand": "WORKFLOW_UNDERSTAND", "generate": "WORKFLOW_GENERATE", "edit": "WORKFLOW_EDIT"}


class Gateway:
    """The job operations, shared by the gRPC and HTTP fronts."""

    def __init__(self, jobs: JobStore, store: ObjectStore, celery: Celery, settings: OrchestratorSettings):
        self.jobs, self.store, self.celery, self.settings = jobs, store, celery, settings
        self.metrics: GatewayMetrics | None = None

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = GatewayMetrics(registry, queue_depth=lambda: self.jobs.r.llen(QUEUE))

    def _count(self, req: jobs_pb2.SubmitJobRequest, result: str) -> None:
        if self.metrics is not None:
            self.metrics.submitted.labels(WORKFLOW_NAMES.get(req.workflow, "unknown"), result).inc()

    def submit(self, req: jobs_pb2.SubmitJobRequest) -> jobs_pb2.Job:
        return self._counted_submit(req, uuid.uuid4().hex)[0]

    def run(self, req: jobs_pb2.SubmitJobRequest, inline_image: bool = False,
            alive=None) -> tuple[jobs_pb2.Job, Iterator[jobs_pb2.Job]]:
        """Submit and follow: the accepted job and its updates, from QUEUED through every change to its
        end. The subscription is made before the job is queued, so a fast worker's first changes are
        not missed. A duplicate (idempotency key) is followed from its state now."""
        job_id = uuid.uuid4().hex
        subscription = self.jobs.subscribe(job_id)
        try:
            job, new = self._counted_submit(req, job_id)
        except Exception:
            subscription.close()
            raise
        if not new:
            subscription.close()
        updates = self.jobs.watch(job.id, None, alive=alive, since=(subscription, job) if new else None)
        return job, (self._with_image(update, inline_image) for update in updates)

    def _counted_submit(self, req: jobs_pb2.SubmitJobRequest, job_id: str) -> tuple[jobs_pb2.Job, bool]:
        try:
            job, new = self._submit(req, job_id)
        except Exception:
            self._count(req, "refused")
            raise
        self._count(req, "accepted" if new else "duplicate")
        return job, new

    def _submit(self, req: jobs_pb2.SubmitJobRequest, job_id: str) -> tuple[jobs_pb2.Job, bool]:
        image = req.image or None
        if req.image_key:
            image = self.store.get_bytes(req.image_key, max_bytes=MAX_IMAGE_BYTES)  # NOT_FOUND if missing
        plan_job(req, image)  # every check the worker will make, before anything is accepted
        if self.jobs.r.llen(QUEUE) >= self.settings.max_queued:
            raise QueueFull(f"{self.settings.max_queued} jobs are waiting; retry later")
        stored = jobs_pb2.SubmitJobRequest()
        stored.CopyFrom(req)
        if req.image:
            stored.image_key = job_prefix(job_id) + "input"
            stored.ClearField("image")
            self.store.put_bytes(stored.image_key, req.image)
        created = self.jobs.create(stored, job_id)
        if not created.new:
            if req.image:
                self.store.delete(stored.image_key)  # the earlier job has its own copy
            return created.job, False
        try:
            self.celery.send_task(TASK, args=[created.job.id], queue=QUEUE)
        except Exception as e:  # noqa: BLE001 - the broker refused: the job must not look accepted
            self.jobs.fail(created.job.id, "UNAVAILABLE", f"could not queue the job: {e}")
            raise StorageError(f"the job queue is unreachable: {e}") from None
        log.info("job accepted", extra={"job_id": created.job.id,
                                        "workflow": jobs_pb2.Workflow.Name(req.workflow)})
        return created.job, True

    def get(self, job_id: str, inline_image: bool = False) -> jobs_pb2.Job:
        return self._with_image(self.jobs.get(job_id), inline_image)

    def watch(self, job_id: str, timeout: float | None, inline_image: bool = False,
              alive=None) -> Iterator[jobs_pb2.Job]:
        for job in self.jobs.watch(job_id, timeout, alive=alive):
            yield self._with_image(job, inline_image)

    def wait(self, job_id: str, timeout: float, inline_image: bool = False) -> jobs_pb2.Job:
        """The job once it has ended, or as it is when `timeout` passes."""
        last = None
        for last in self.jobs.watch(job_id, timeout):
            pass
        return self._with_image(last, inline_image)

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        return self.jobs.request_cancel(job_id)

    def delete_session(self, session_id: str, timeout: float = 60.0) -> None:
        """Through a worker (only workers reach the LLM service), waiting for its answer."""
        check_session_id(session_id)
        result = self.celery.send_task(DELETE_SESSION_TASK, args=[session_id], queue=CONTROL_QUEUE)
        try:
            deleted = result.get(timeout=timeout)
        except CeleryTimeout:
            raise StorageError(f"no worker ended session {session_id!r} within {timeout:.0f} s; retry") from None
        finally:
            result.forget()
        if not deleted:
            raise SessionNotFound(session_id)

    def image(self, job_id: str) -> bytes:
        job = self.jobs.get(job_id)
        if not job.result.image_key:
            raise NoOutput(f"job {job_id} has no image: it is {jobs_pb2.JobState.Name(job.state)}"
                           + ("" if job.workflow != jobs_pb2.WORKFLOW_UNDERSTAND else " (understand answers text)"))
        return self.store.get_bytes(job.result.image_key)

    def ready(self) -> str | None:
        """None when Redis and the bucket answer, else what does not."""
        try:
            self.jobs.r.ping()
        except redis.RedisError as e:
            return f"redis: {e}"
        try:
            self.store.ensure_bucket()
        except StorageError as e:
            return f"object storage: {e}"
        return None

    def _with_image(self, job: jobs_pb2.Job, inline: bool) -> jobs_pb2.Job:
        if inline and job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.result.image_key:
            job.result.image_png = self.store.get_bytes(job.result.image_key)
        return job


# ---- gRPC ----------------------------------------------------------------------------------------
class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, gateway: Gateway):
        self.g = gateway

    def Submit(self, request, context):
        return self.g.submit(request)

    def Run(self, request, context):
        job, updates = self.g.run(request, request.inline_image, alive=context.is_active)
        ended = threading.Event()

        def on_done():  # a caller that gives up on a synchronous run does not leave it running
            if not ended.is_set():
                try:
                    self.g.cancel(job.id)
                except Exception:  # noqa: BLE001
                    log.warning("could not cancel an abandoned run", exc_info=True, extra={"job_id": job.id})

        context.add_callback(on_done)
        # No timeout of our own: the caller's deadline ends the call (DEADLINE_EXCEEDED), gRPC enforces it.
        for update in updates:
            if is_terminal(update):
                ended.set()
            yield update

    def Get(self, request, context):
        return self.g.get(request.id, request.inline_image)

    def Watch(self, request, context):
        yield from self.g.watch(request.id, None, request.inline_image, alive=context.is_active)

    def Cancel(self, request, context):
        return self.g.cancel(request.id)

    def DeleteSession(self, request, context):
        self.g.delete_session(request.session_id)
        return llm_pb2.DeleteSessionResponse(deleted=True)


# ---- HTTP ----------------------------------------------------------------------------------------
def _job_json(job: jobs_pb2.Job, status: int = 200) -> JSONResponse:
    return JSONResponse(json_format.MessageToDict(job, preserving_proto_field_name=True), status_code=status)


def _wait_param(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        wait = float(value)
    except ValueError:
        raise InputError(f"wait: a number of seconds, got {value!r}") from None
    if not 0 <= wait <= MAX_WAIT_S:
        raise InputError(f"wait: must be in [0, {MAX_WAIT_S:g}] seconds, got {value}")
    return wait


def build_http_app(g: Gateway, auth_token: str | None = None) -> FastAPI:
    app = FastAPI(title="bagel-serve gateway", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if auth_token and path.startswith("/v1/"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), auth_token.encode()):
                return JSONResponse({"code": "UNAUTHENTICATED", "message": "missing or invalid bearer token"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse({"code": "INVALID_ARGUMENT",
                                 "message": f"request body of {length} bytes; the limit is {MAX_BODY_BYTES}"},
                                status_code=413)
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON error with its status
            response = _error_json(exc)
        if g.metrics is not None:
            route = request.scope.get("route")
            g.metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        return JSONResponse({"code": "INVALID_ARGUMENT", "message": f"bad request: {exc.errors()}"}, status_code=400)

    @app.post("/v1/jobs")
    async def submit(request: Request, wait: str | None = None):
        timeout = _wait_param(wait)
        req = await _read_submit(request)
        # Redis, S3 and waiting block: off the event loop.
        job = await run_in_threadpool(g.submit, req)
        if timeout:
            job = await run_in_threadpool(g.wait, job.id, timeout, req.inline_image)
        return _job_json(job, 200 if is_terminal(job) else 202)

    @app.get("/v1/jobs/{job_id}")
    def get(job_id: str, wait: str | None = None, inline_image: bool = False):
        timeout = _wait_param(wait)
        return _job_json(g.wait(job_id, timeout, inline_image) if timeout else g.get(job_id, inline_image))

    @app.get("/v1/jobs/{job_id}/events")
    def events(job_id: str, wait: str | None = None):
        """Server-sent events: the Job as JSON at every change until it ends (or `wait` seconds pass)."""
        timeout = _wait_param(wait) or MAX_WAIT_S
        g.get(job_id)  # an unknown job is a 404 here, not an empty stream

        def stream():
            for job in g.watch(job_id, timeout):
                data = json.dumps(json_format.MessageToDict(job, preserving_proto_field_name=True))
                yield f"event: job\ndata: {data}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/jobs/{job_id}/image")
    def image(job_id: str):
        return Response(g.image(job_id), media_type="image/png")

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        return _job_json(g.cancel(job_id))

    @app.delete("/v1/sessions/{session_id}")
    def end_session(session_id: str):
        g.delete_session(session_id)
        return {"deleted": True}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        why = g.ready()
        return JSONResponse({"status": "ok" if why is None else "unavailable", "reason": why or ""},
                            status_code=200 if why is None else 503)

    return app


class TooLarge(ValueError):
    """A request body or upload over the gateway's limit (HTTP 413)."""


def _error_json(exc: Exception) -> JSONResponse:
    """The gRPC status table decides (services/common/rpc/errors.py); unexpected errors say nothing more."""
    if isinstance(exc, TooLarge):
        return JSONResponse({"code": "INVALID_ARGUMENT", "message": str(exc)}, status_code=413)
    code = status_for(exc)
    message = str(exc) if code != grpc.StatusCode.INTERNAL else "internal error"
    if code == grpc.StatusCode.INTERNAL:
        log.error("http request failed", exc_info=exc)
    return JSONResponse({"code": code.name, "message": message}, status_code=HTTP_CODES.get(code, 500))


async def _read_submit(request: Request) -> jobs_pb2.SubmitJobRequest:
    """A JSON SubmitJobRequest, or multipart/form-data with the request as JSON in the field `request`
    and the image as the file `image` (no base64: `curl -F request=@job.json -F image=@cat.png`)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=2)
        raw = form.get("request")
        if isinstance(raw, UploadFile):
            raw = (await raw.read()).decode("utf-8", "replace")
        req = _parse_submit(_json_object(raw or "{}", "the `request` field"))
        upload = form.get("image")
        if upload is not None:
            if req.image or req.image_key:
                raise InputError("the image comes either as the `image` file or inside the request, not both")
            if isinstance(upload, UploadFile) and (upload.size or 0) > MAX_IMAGE_BYTES:
                raise TooLarge(f"the image file is {upload.size} bytes; the limit is {MAX_IMAGE_BYTES}")
            req.image = await upload.read() if isinstance(upload, UploadFile) else upload.encode()
        return req
    return _parse_submit(_json_object(await _read_body(request), "the body"))


async def _read_body(request: Request) -> bytes:
    """The body, refused past MAX_BODY_BYTES even when no Content-Length announced it (chunked)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TooLarge(f"the request body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_object(raw: str | bytes, what: str) -> dict:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise InputError(f"{what} is not JSON: {e}") from None


def _parse_submit(body: dict) -> jobs_pb2.SubmitJobRequest:
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object (a SubmitJobRequest)")
    body = dict(body)
    if isinstance(body.get("workflow"), str):
        body["workflow"] = _SHORT_WORKFLOWS.get(body["workflow"].lower(), body["workflow"])
    try:
        return json_format.ParseDict(body, jobs_pb2.SubmitJobRequest())
    except json_format.ParseError as e:
        raise InputError(f"bad request body: {e}") from None


# ---- the process ---------------------------------------------------------------------------------
class GatewayProcess:
    """Both fronts on one Gateway: gRPC on the scaffold (health, reflection, auth, metrics), HTTP on uvicorn."""

    def __init__(self, gateway: Gateway, *, host: str = "0.0.0.0", http_port: int = 8080, grpc_port: int = 50050,
                 metrics_port: int = 0, auth_token: str | None = None, max_concurrency: int = 256):
        self.gateway = gateway
        options = ServerOptions(host=host, port=grpc_port, metrics_port=metrics_port, auth_token=auth_token,
                                max_concurrency=max_concurrency, drain_seconds=0.0, grace_seconds=10.0)
        metrics = Metrics()
        gateway.attach_metrics(metrics.registry)
        self.grpc = ModelServer("gateway", options, metrics)
        servicer = JobServicer(gateway)
        self.grpc.add_service(service_name(jobs_pb2, "JobService"),
                              lambda s: jobs_pb2_grpc.add_JobServiceServicer_to_server(servicer, s))
        self.http_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.http_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.http_socket.bind((host, http_port))
        self.http_port = self.http_socket.getsockname()[1]
        config = uvicorn.Config(build_http_app(gateway, auth_token), log_config=None, access_log=False,
                                timeout_graceful_shutdown=10)
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
        from services.orchestrator.celery_app import make_app

        celery = make_app(settings)
    store = ObjectStore(storage)
    return Gateway(JobStore.from_url(settings.redis_url, ttl_seconds=settings.job_ttl_s), store, celery, settings)


def add_gateway_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP/JSON job API; 0 picks a free port (logged)")
    p.add_argument("--grpc-port", type=int, default=50050, help="gRPC JobService; 0 picks a free port (logged)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port; 0 disables")
    p.add_argument("--log-level", default="INFO")
    return p


def gateway_from_args(args: argparse.Namespace) -> int:
    """Configuration beyond the flags comes from the environment (settings.py, BAGEL_S3_*)."""
    import signal

    configure_logging(args.log_level)
    settings = OrchestratorSettings.from_env()
    try:
        gateway = build_gateway(settings)
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
