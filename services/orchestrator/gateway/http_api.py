"""The HTTP/JSON front on the job operations (FastAPI). Bodies are the protos in protobuf's JSON mapping;
`workflow` also takes "generate" etc. Errors are JSON `{"code", "message"}` with the HTTP code each
error declares (services/common/contracts/errors.py)."""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from google.protobuf import json_format
from starlette.datastructures import UploadFile  # what request.form() returns

from services.common.contracts import InputError, TooLarge, UnsupportedMediaType, grpc_code_of, http_status_of
from services.common.images import MAX_IMAGE_BYTES
from services.common.protos import jobs_pb2
from services.orchestrator.gateway.openai_errors import is_openai_path, openai_error
from services.orchestrator.gateway.operations import IMAGE_FORMATS, Gateway
from services.orchestrator.gateway.streams import client_key
from services.orchestrator.jobs import is_terminal

log = logging.getLogger("bagel.gateway")

MAX_WAIT_S = 600.0
# A 32 MiB image is ~43 MiB as base64 JSON; everything else in a request is small.
MAX_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 1024 * 1024
PLAYGROUND_DIR = Path(__file__).with_name("playground")  # the web playground's static files (package data)
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


KEEPALIVE_S = 15.0  # an event stream sends at least this often, so idle proxies keep it open

JOB_RESPONSES = {400: {"description": "bad request (code INVALID_ARGUMENT)"},
                 401: {"description": "missing or wrong bearer token"},
                 404: {"description": "no such job"}}


def build_http_app(g: Gateway, auth_token: str | None = None, stopping: threading.Event | None = None) -> FastAPI:
    """The HTTP front, on asyncio end to end: waiting (long polls, event streams, synchronous OpenAI
    calls) follows Redis with async pub/sub and holds no thread; only short blocking calls (planning and
    storing a job, reading an image) go to the thread pool. Once `stopping` is set (the process is shutting
    down), long polls answer with the job as it is and event streams end after sending it: no job is
    cancelled, and the client follows it again on another gateway."""
    stopping = stopping or threading.Event()
    app = FastAPI(title="bagel-serve gateway", version="1", docs_url="/docs", redoc_url=None,
                  description="The job API and the OpenAI-compatible API of a BAGEL deployment.")

    app.add_middleware(Guard, gateway=g, auth_token=auth_token)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        return error_response(request.url.path, "INVALID_ARGUMENT", f"bad request: {_describe(exc)}", 400)

    async def follow(request: Request, job_id: str, timeout: float, inline_image: bool) -> jobs_pb2.Job:
        async def wanted() -> bool:
            return not stopping.is_set() and await _connected(request)

        job = await g.reader.wait(job_id, timeout, still_wanted=wanted)
        return await run_in_threadpool(g._with_image, job, inline_image)

    @app.post("/v1/jobs", responses={202: {"description": "accepted: the Job"}, **JOB_RESPONSES})
    async def submit(request: Request, wait: str | None = None):
        """Submit a job (a SubmitJobRequest as JSON, or multipart: `request` JSON + `image` file). With
        `wait`, answers 200 with the ended Job if it ends within that many seconds."""
        timeout = _wait_param(wait)
        req = await _read_submit(request)
        job = await run_in_threadpool(g.submit, req)  # planning, S3 and Redis writes: short, blocking
        if timeout:
            job = await follow(request, job.id, timeout, req.inline_image)
        else:
            job = await run_in_threadpool(g._with_image, job, False)
        return _job_json(job, 200 if is_terminal(job) else 202)

    @app.get("/v1/jobs/{job_id}", responses=JOB_RESPONSES)
    async def get(request: Request, job_id: str, wait: str | None = None, inline_image: bool = False):
        """The Job; with `wait`, as soon as it ends (long poll)."""
        timeout = _wait_param(wait)
        if timeout:
            return _job_json(await follow(request, job_id, timeout, inline_image))
        return _job_json(await run_in_threadpool(g._with_image, await g.reader.get(job_id), inline_image))

    @app.get("/v1/jobs/{job_id}/events", responses=JOB_RESPONSES)
    async def events(job_id: str, wait: str | None = None):
        """Server-sent events: the Job as JSON at every change until it ends (or `wait` seconds pass), and a
        keep-alive comment at least every 15 s."""
        timeout = _wait_param(wait) or MAX_WAIT_S
        await g.reader.get(job_id)  # an unknown job is a 404 here, not an empty stream

        async def stream():
            last_sent = time.monotonic()
            async for job in g.reader.watch(job_id, timeout, idle=True):
                if job is None and stopping.is_set():  # shutting down: the job as it is, then the end
                    job = await g.reader.get(job_id)
                if job is None:
                    if time.monotonic() - last_sent >= KEEPALIVE_S:
                        last_sent = time.monotonic()
                        yield ": keep-alive\n\n"
                    continue
                if job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.result.image_key:
                    g.add_result_url(job)
                last_sent = time.monotonic()
                data = json.dumps(json_format.MessageToDict(job, preserving_proto_field_name=True))
                yield f"event: job\ndata: {data}\n\n"
                if stopping.is_set():
                    return

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/image", responses=JOB_RESPONSES, response_class=Response)
    async def image(job_id: str):
        """The output PNG of a generate / edit job."""
        return Response(await run_in_threadpool(g.image, job_id), media_type="image/png")

    @app.get("/v1/jobs/{job_id}/result", responses=JOB_RESPONSES, response_class=Response)
    async def result(job_id: str, format: str = "png", quality: int | None = None):
        """The output image in `format` (png, jpeg, webp; `quality` 0-100 for the lossy ones): the URL a
        job names when the object store cannot presign one."""
        data = await run_in_threadpool(g.result_image, job_id, format, quality)
        return Response(data, media_type=IMAGE_FORMATS[format])

    @app.post("/v1/jobs/{job_id}/cancel", responses=JOB_RESPONSES)
    async def cancel(job_id: str):
        return _job_json(await run_in_threadpool(g.cancel, job_id))

    @app.delete("/v1/sessions/{session_id}", responses={404: {"description": "no such session"}})
    async def end_session(session_id: str):
        await run_in_threadpool(g.delete_session, session_id)
        return {"deleted": True}

    @app.get("/healthz")
    async def healthz():
        """Alive: answers at once, whatever else is open."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "Redis or the bucket unreachable, or (when "
                                                    "BAGEL_READY_REQUIRES_WORKER) no worker consuming jobs"}})
    async def readyz():
        """`workers`: how many consume the job queue, reported always, required only when configured."""
        workers = None
        try:
            await g.reader.ping()
            why = await run_in_threadpool(g.ready)
            workers = await run_in_threadpool(g.workers)
        except Exception as e:  # noqa: BLE001
            why = f"redis: {e}"
        return JSONResponse({"status": "ok" if why is None else "unavailable", "reason": why or "",
                             "workers": workers}, status_code=200 if why is None else 503)

    @app.get("/playground", include_in_schema=False)
    async def playground():
        # Relative, so the page's relative links (and its API calls, `../v1/`) work behind a path prefix.
        return RedirectResponse("playground/", status_code=308)

    # The playground is public, like /docs: it holds no data, and its API calls carry the user's token.
    app.mount("/playground", StaticFiles(directory=PLAYGROUND_DIR, html=True), name="playground")

    from services.orchestrator.gateway.openai_api import openai_router

    app.include_router(openai_router(g))
    app.openapi = lambda: _openapi_as_served(app)
    return app


def _openapi_as_served(app: FastAPI) -> dict:
    """The schema FastAPI derives, corrected to what the server sends: a request that does not validate is
    answered 400 (not FastAPI's 422), in the path's own error shape."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault("400", {"description": "bad request"})
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


class Guard:
    """Auth, the body-size limit, errors as JSON and the request counter, as plain ASGI middleware: it
    passes the connection through untouched, so a handler sees its client hang up (Starlette's
    BaseHTTPMiddleware would hide that) and streams are not buffered."""

    def __init__(self, app, gateway: Gateway, auth_token: str | None):
        self.app, self.g, self.auth_token = app, gateway, auth_token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(path, headers)
        if refusal is not None:
            return await self._respond(scope, refusal, receive, send)
        status = {}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            # Held around the whole response, an event stream's body included; released however it ends.
            with self.g.streams.hold(self._client(scope, headers)) if _waits(scope) else nullcontext():
                await self.app(scope, receive, send_and_note)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a JSON error with its status
            if "code" in status:
                raise  # the response had started (a stream): nothing else can be sent
            await self._respond(scope, _error_json(path, exc), receive, send)
            return
        self._count(scope, status.get("code", 500))

    def _client(self, scope, headers: dict[str, str]) -> str:
        # With auth on, the token was checked in _refusal: it names the client.
        token = headers.get("authorization", "").partition(" ")[2].strip() if self.auth_token else None
        client = scope.get("client")
        return client_key(token, client[0] if client else None)

    def _refusal(self, path: str, headers: dict[str, str]):
        if self.auth_token and path.startswith("/v1/"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.auth_token.encode()):
                return error_response(path, "UNAUTHENTICATED", "missing or invalid bearer token", 401,
                                      headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(path, "INVALID_ARGUMENT",
                                  f"request body of {length} bytes; the limit is {MAX_BODY_BYTES}", 413)
        return None

    async def _respond(self, scope, response, receive, send) -> None:
        await response(scope, receive, send)
        self._count(scope, response.status_code)

    def _count(self, scope, code: int) -> None:
        if self.g.metrics is not None:
            route = scope.get("route")
            self.g.metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(code)).inc()


# The OpenAI-compatible calls that answer once their jobs have ended (or stream until then).
_WAITING_OPENAI = ("/v1/images/generations", "/v1/images/edits", "/v1/chat/completions")


def _waits(scope) -> bool:
    """Whether a request stays open while a job runs: an event stream, a long poll (`wait` other than 0) or a
    synchronous OpenAI call. These count against the client's open streams."""
    path, method = scope["path"].rstrip("/"), scope["method"]
    if method == "GET" and path.startswith("/v1/jobs/") and path.endswith("/events"):
        return True
    if method == "POST" and path in _WAITING_OPENAI:
        return True
    if (method, path.count("/")) in (("POST", 2), ("GET", 3)) and path.startswith("/v1/jobs"):
        wait = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("wait", [""])[-1]
        try:
            return float(wait) > 0
        except ValueError:
            return False  # absent or malformed: answered at once (400 for the latter)
    return False


async def _connected(request: Request) -> bool:
    return not await request.is_disconnected()


def _describe(exc: RequestValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
                     for e in exc.errors()) or str(exc)


def error_response(path: str, code: str, message: str, status: int, headers: dict | None = None) -> JSONResponse:
    """The job API's error shape, or OpenAI's on the OpenAI-compatible paths."""
    if is_openai_path(path):
        return JSONResponse(openai_error(code, message, status), status_code=status, headers=headers)
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def _error_json(path: str, exc: Exception) -> JSONResponse:
    """The error's own declaration decides the status; unexpected errors say nothing more."""
    code = grpc_code_of(exc)
    if code == "INTERNAL":
        log.error("http request failed", exc_info=exc)
    message = str(exc) if code != "INTERNAL" else "internal error"
    return error_response(path, code, message, http_status_of(exc))


async def _read_submit(request: Request) -> jobs_pb2.SubmitJobRequest:
    """A JSON SubmitJobRequest, or multipart/form-data with the request as JSON in the field `request`
    and the image as the file `image` (no base64: `curl -F request=@job.json -F image=@cat.png`). Any
    other content type is refused (415), not guessed at: `curl -d` sends form-encoded bodies, say."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ("application/json", "multipart/form-data"):
        raise UnsupportedMediaType(f"content type {media_type or '(none)'!r}: send application/json, or "
                                   "multipart/form-data with the request and the image file")
    if media_type == "multipart/form-data":
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
    except RecursionError:  # the parser recurses per nesting level: deep bodies are the client's error
        raise InputError(f"{what} is nested too deeply") from None


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
    except RecursionError:
        raise InputError("bad request body: nested too deeply") from None
