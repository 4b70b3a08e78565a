"""The HTTP/JSON front on the job operations (FastAPI). Bodies are the protos in protobuf's JSON mapping;
`workflow` also takes "generate" etc. Errors are JSON `{"code", "message"}` with the HTTP code each
error declares (services/common/contracts/errors.py)."""

from __future__ import annotations

import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf import json_format
from starlette.datastructures import UploadFile  # what request.form() returns

from services.common.contracts import InputError, TooLarge, grpc_code_of, http_status_of
from services.common.images import MAX_IMAGE_BYTES
from services.common.protos import jobs_pb2
from services.orchestrator.gateway.operations import Gateway
from services.orchestrator.jobs import is_terminal

log = logging.getLogger("bagel.gateway")

MAX_WAIT_S = 600.0
# A 32 MiB image is ~43 MiB as base64 JSON; everything else in a request is small.
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 1024 * 1024
_SHORT_WORKFLOWS = {"understand": "WORKFLOW_UNDERSTAND", "generate": "WORKFLOW_GENERATE", "edit": "WORKFLOW_EDIT"}


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


def _error_json(exc: Exception) -> JSONResponse:
    """The error's own declaration decides the status; unexpected errors say nothing more."""
    code = grpc_code_of(exc)
    if code == "INTERNAL":
        log.error("http request failed", exc_info=exc)
    message = str(exc) if code != "INTERNAL" else "internal error"
    return JSONResponse({"code": code, "message": message}, status_code=http_status_of(exc))


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
