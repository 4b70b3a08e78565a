"""`Client` (blocking) and `AsyncClient` (asyncio): the job API of a running gateway, over HTTP or gRPC,
with the same methods and the same typed results and errors on both transports."""

from __future__ import annotations

from typing import AsyncIterator, Iterator
from urllib.parse import urlsplit

from bagel_serve.client.errors import Cancelled, InvalidArgument, error_for, job_failed
from bagel_serve.client.types import (ImageInput, ImageResult, Job, JobState, Progress, TextResult, Workflow,
                                      build_request, result_of)

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT_S = 60.0


def _endpoint(url: str, transport: str | None) -> tuple[str, str, bool]:
    """(transport, address, secure) from the URL: grpc://host:port and grpcs://host:port are gRPC,
    http(s)://host:port HTTP; `transport` may ask for gRPC on an http(s) URL's host:port."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = parts.scheme.lower()
    if scheme in ("grpc", "grpcs"):
        if transport not in (None, "grpc"):
            raise ValueError(f"transport={transport!r} with a {scheme}:// URL")
        return "grpc", parts.netloc, scheme == "grpcs"
    if scheme not in ("http", "https"):
        raise ValueError(f"url: http(s)://host:port or grpc(s)://host:port, got {url!r}")
    if transport in (None, "http"):
        return "http", f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}", scheme == "https"
    if transport == "grpc":
        return "grpc", parts.netloc, scheme == "https"
    raise ValueError(f"transport: 'http' or 'grpc', got {transport!r}")


def _outcome(job: Job) -> TextResult | ImageResult:
    """The result of an ended job, or its ending as an exception."""
    if job.state is JobState.SUCCEEDED:
        return result_of(job)
    if job.state is JobState.CANCELLED:
        raise Cancelled(job.error_message or "the job was cancelled", job=job)
    if job.state is JobState.FAILED:
        raise job_failed(job.error_code, job.error_message, job=job)
    raise error_for("UNKNOWN", f"job {job.id} is {job.state.value}, not ended", job=job)


class _Requests:
    """The request-building half both clients share: each workflow's arguments into a SubmitJobRequest."""

    @staticmethod
    def _understand(image, prompt, kw):
        return build_request(Workflow.UNDERSTAND, prompt, image=image, **kw)

    @staticmethod
    def _generate(prompt, kw):
        return build_request(Workflow.GENERATE, prompt, **kw)

    @staticmethod
    def _edit(image, prompt, kw):
        if image is None and not kw.get("image_key"):
            raise InvalidArgument("edit needs an image")
        return build_request(Workflow.EDIT, prompt, image=image, **kw)


class Client(_Requests):
    """A blocking client of the job API.

        with Client("http://127.0.0.1:8080", token="...") as c:
            out = c.generate("a red boat", width=512, height=512, seed=7, wait=True)
            out.image.save("boat.png")

    `url`: http(s)://host:port, or grpc://host:port (plain) / grpcs://host:port (TLS). `timeout`: seconds
    for each call (waits have their own `timeout`). `tls`: a root certificate (path or PEM bytes) to
    trust instead of the system's, or False (HTTPS only) to skip verification.

    The workflow methods submit and return a `Job` handle at once; with `wait=True` they return the
    result (`TextResult` / `ImageResult`) and raise `JobFailed` / `Cancelled` if the job did not succeed.
    Every error is a `BagelError` subclass named after its status."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 transport: str | None = None, tls=None):
        from bagel_serve.client import _grpc, _http

        kind, address, secure = _endpoint(url, transport)
        self.transport = kind
        self._t = (_http.HttpTransport(address, token, timeout, tls) if kind == "http"
                   else _grpc.GrpcTransport(address, secure, token, timeout, tls))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._t.close()

    # ---- workflows ----
    def understand(self, image: ImageInput | None, prompt: str, *, wait: bool = False,
                   timeout: float | None = None, **options) -> Job | TextResult:
        """Answer `prompt` about `image` (None: a follow-up in `session`). Options: think, max_new_tokens,
        do_sample, temperature, top_p, seed, session, session_ttl_s, session_resume (a later turn:
        fail rather than start afresh if the session is gone), idempotency_key, deadline_s."""
        return self._start(self._understand(image, prompt, options), wait, timeout)

    def generate(self, prompt: str, *, wait: bool = False, timeout: float | None = None,
                 **options) -> Job | ImageResult:
        """An image from `prompt`. Options: width, height, steps, seed, cfg_text_scale, cfg_img_scale,
        cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift, think, session, idempotency_key,
        deadline_s."""
        return self._start(self._generate(prompt, options), wait, timeout)

    def edit(self, image: ImageInput, prompt: str, *, wait: bool = False, timeout: float | None = None,
             **options) -> Job | ImageResult:
        """`image` edited following `prompt`; the options of `generate` (the size follows the image)."""
        return self._start(self._edit(image, prompt, options), wait, timeout)

    def _start(self, req, wait: bool, timeout: float | None):
        job = self.submit(req)
        return self.result(job.id, timeout=timeout) if wait else job

    def submit(self, request) -> Job:
        """Submit a ready `jobs_pb2.SubmitJobRequest` (the workflow methods build one for you)."""
        return Job.from_proto(self._t.submit(request), self)

    # ---- jobs ----
    def get(self, job_id: str) -> Job:
        return Job.from_proto(self._t.get(job_id), self)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once it has ended (whatever the ending); DeadlineExceeded after `timeout` seconds."""
        return Job.from_proto(self._t.wait(job_id, timeout), self)

    def result(self, job_id: str, timeout: float | None = None) -> TextResult | ImageResult:
        """Wait for the job and return its result; JobFailed / Cancelled if it did not succeed."""
        return _outcome(Job.from_proto(self._t.wait(job_id, timeout, inline_image=True), self))

    def watch(self, job_id: str) -> Iterator[Progress]:
        """The job's changes in order, from its state now to its end (the last one has `state.ended`)."""
        for msg in self._t.watch(job_id):
            yield Job.from_proto(msg, self).progress()

    def cancel(self, job_id: str) -> Job:
        """Ask the job to stop: a queued job is CANCELLED at once, a running one at its next step."""
        return Job.from_proto(self._t.cancel(job_id), self)

    def delete_session(self, session_id: str) -> None:
        """End a conversation now (NotFound when there is none by that id)."""
        self._t.delete_session(session_id)


class AsyncClient(_Requests):
    """The same API for asyncio: every method is a coroutine, `watch` an async iterator.

        async with AsyncClient("grpc://127.0.0.1:50060") as c:
            job = await c.generate("a red boat", steps=20)
            async for p in c.watch(job.id):
                print(p.stage, p.step, p.total)
            out = await c.result(job.id)
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 transport: str | None = None, tls=None):
        from bagel_serve.client import _grpc, _http

        kind, address, secure = _endpoint(url, transport)
        self.transport = kind
        self._t = (_http.AsyncHttpTransport(address, token, timeout, tls) if kind == "http"
                   else _grpc.AsyncGrpcTransport(address, secure, token, timeout, tls))

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._t.close()

    async def understand(self, image: ImageInput | None, prompt: str, *, wait: bool = False,
                         timeout: float | None = None, **options) -> Job | TextResult:
        return await self._start(self._understand(image, prompt, options), wait, timeout)

    async def generate(self, prompt: str, *, wait: bool = False, timeout: float | None = None,
                       **options) -> Job | ImageResult:
        return await self._start(self._generate(prompt, options), wait, timeout)

    async def edit(self, image: ImageInput, prompt: str, *, wait: bool = False, timeout: float | None = None,
                   **options) -> Job | ImageResult:
        return await self._start(self._edit(image, prompt, options), wait, timeout)

    async def _start(self, req, wait: bool, timeout: float | None):
        job = await self.submit(req)
        return await self.result(job.id, timeout=timeout) if wait else job

    async def submit(self, request) -> Job:
        return Job.from_proto(await self._t.submit(request), self)

    async def get(self, job_id: str) -> Job:
        return Job.from_proto(await self._t.get(job_id), self)

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        return Job.from_proto(await self._t.wait(job_id, timeout), self)

    async def result(self, job_id: str, timeout: float | None = None) -> TextResult | ImageResult:
        return _outcome(Job.from_proto(await self._t.wait(job_id, timeout, inline_image=True), self))

    async def watch(self, job_id: str) -> AsyncIterator[Progress]:
        async for msg in self._t.watch(job_id):
            yield Job.from_proto(msg, self).progress()

    async def cancel(self, job_id: str) -> Job:
        return Job.from_proto(await self._t.cancel(job_id), self)

    async def delete_session(self, session_id: str) -> None:
        await self._t.delete_session(session_id)
