"""The job API over HTTP/JSON (httpx), sync and async. Replies are parsed into `jobs_pb2.Job` so both
transports hand the client the same messages."""

from __future__ import annotations

import json
import ssl
import time
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator, Iterator
from urllib.parse import quote

import httpx
from google.protobuf import json_format

from bagel_serve.client.errors import DeadlineExceeded, Unavailable, from_http
from services.common.protos import jobs_pb2

LONG_POLL_S = 300.0  # one long poll's length (the gateway allows 600); longer waits poll again


def _job(data: bytes | str | dict) -> jobs_pb2.Job:
    body = json.loads(data) if not isinstance(data, dict) else data
    # Newer gateways may add fields: ignore them rather than break old clients.
    return json_format.ParseDict(body, jobs_pb2.Job(), ignore_unknown_fields=True)


def verify_option(tls) -> bool | ssl.SSLContext:
    """httpx's `verify`: True (system roots), False, or a context trusting the given root certificate
    (a path or PEM bytes)."""
    if tls is None or isinstance(tls, bool):
        return True if tls is None else tls
    if isinstance(tls, (bytes, bytearray)):
        return ssl.create_default_context(cadata=bytes(tls).decode())
    return ssl.create_default_context(cafile=str(tls))


def submit_parts(req: jobs_pb2.SubmitJobRequest) -> dict:
    """httpx arguments for POST /v1/jobs: multipart when there is an image (no base64 inflation)."""
    if not req.image:
        return {"json": json_format.MessageToDict(req, preserving_proto_field_name=True)}
    rest = jobs_pb2.SubmitJobRequest()
    rest.CopyFrom(req)
    rest.ClearField("image")
    body = json.dumps(json_format.MessageToDict(rest, preserving_proto_field_name=True))
    return {"files": {"request": (None, body, "application/json"),
                      "image": ("image", req.image, "application/octet-stream")}}


def _check(r: httpx.Response) -> httpx.Response:
    if r.status_code >= 400:
        raise from_http(r.status_code, r.content)
    return r


def _sse_jobs(lines) -> Iterator[jobs_pb2.Job]:
    """Jobs from server-sent-event lines: `data:` lines of an event, dispatched at the blank line;
    comments (keep-alives) skipped."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield _job("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))


@contextmanager
def _errors():
    try:
        yield
    except httpx.TimeoutException as e:
        raise DeadlineExceeded(f"no answer in time: {e}") from e
    except httpx.TransportError as e:
        raise Unavailable(f"cannot reach the gateway: {e}") from e


@asynccontextmanager
async def _aerrors():
    with _errors():
        yield


class HttpTransport:
    def __init__(self, base_url: str, token: str | None, timeout: float, tls=None):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, verify=verify_option(tls))

    def close(self) -> None:
        self.http.close()

    def submit(self, req: jobs_pb2.SubmitJobRequest) -> jobs_pb2.Job:
        with _errors():
            return _job(_check(self.http.post("/v1/jobs", **submit_parts(req))).content)

    def get(self, job_id: str, inline_image: bool = False) -> jobs_pb2.Job:
        with _errors():
            r = self.http.get(f"/v1/jobs/{quote(job_id, safe='')}", params={"inline_image": _flag(inline_image)})
            return _job(_check(r).content)

    def wait(self, job_id: str, timeout: float | None, inline_image: bool = False) -> jobs_pb2.Job:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LONG_POLL_S if end is None else min(LONG_POLL_S, end - time.monotonic())
            if left <= 0:
                raise DeadlineExceeded(f"job {job_id} had not ended after {timeout:g} s")
            with _errors():
                r = self.http.get(f"/v1/jobs/{quote(job_id, safe='')}",
                                  params={"wait": f"{left:.3f}", "inline_image": _flag(inline_image)},
                                  timeout=left + self.timeout)  # the server answers after `left` at most
                job = _job(_check(r).content)
            if job.state in ENDED:
                return job

    def watch(self, job_id: str) -> Iterator[jobs_pb2.Job]:
        last = None
        while True:  # a stream ends after the gateway's longest wait: reconnect until the job has ended
            with _errors(), self.http.stream("GET", f"/v1/jobs/{quote(job_id, safe='')}/events",
                                             timeout=httpx.Timeout(self.timeout, read=max(self.timeout, 60))) as r:
                if r.status_code >= 400:
                    r.read()
                    _check(r)
                for job in _sse_jobs(r.iter_lines()):
                    if job != last:  # a reconnection starts with the state already seen
                        last = job
                        yield job
                    if job.state in ENDED:
                        return

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        with _errors():
            return _job(_check(self.http.post(f"/v1/jobs/{quote(job_id, safe='')}/cancel")).content)

    def delete_session(self, session_id: str) -> None:
        with _errors():
            _check(self.http.delete(f"/v1/sessions/{quote(session_id, safe='')}"))


class AsyncHttpTransport:
    def __init__(self, base_url: str, token: str | None, timeout: float, tls=None):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout,
                                      verify=verify_option(tls))

    async def close(self) -> None:
        await self.http.aclose()

    async def submit(self, req: jobs_pb2.SubmitJobRequest) -> jobs_pb2.Job:
        async with _aerrors():
            return _job(_check(await self.http.post("/v1/jobs", **submit_parts(req))).content)

    async def get(self, job_id: str, inline_image: bool = False) -> jobs_pb2.Job:
        async with _aerrors():
            r = await self.http.get(f"/v1/jobs/{quote(job_id, safe='')}",
                                    params={"inline_image": _flag(inline_image)})
            return _job(_check(r).content)

    async def wait(self, job_id: str, timeout: float | None, inline_image: bool = False) -> jobs_pb2.Job:
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LONG_POLL_S if end is None else min(LONG_POLL_S, end - time.monotonic())
            if left <= 0:
                raise DeadlineExceeded(f"job {job_id} had not ended after {timeout:g} s")
            async with _aerrors():
                r = await self.http.get(f"/v1/jobs/{quote(job_id, safe='')}",
                                        params={"wait": f"{left:.3f}", "inline_image": _flag(inline_image)},
                                        timeout=left + self.timeout)
                job = _job(_check(r).content)
            if job.state in ENDED:
                return job

    async def watch(self, job_id: str) -> AsyncIterator[jobs_pb2.Job]:
        last = None
        while True:
            async with _aerrors(), self.http.stream(
                    "GET", f"/v1/jobs/{quote(job_id, safe='')}/events",
                    timeout=httpx.Timeout(self.timeout, read=max(self.timeout, 60))) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _check(r)
                data: list[str] = []
                async for line in r.aiter_lines():  # the same parsing as _sse_jobs, line by line
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
                        continue
                    if line or not data:
                        continue
                    job, data = _job("\n".join(data)), []
                    if job != last:
                        last = job
                        yield job
                    if job.state in ENDED:
                        return

    async def cancel(self, job_id: str) -> jobs_pb2.Job:
        async with _aerrors():
            return _job(_check(await self.http.post(f"/v1/jobs/{quote(job_id, safe='')}/cancel")).content)

    async def delete_session(self, session_id: str) -> None:
        async with _aerrors():
            _check(await self.http.delete(f"/v1/sessions/{quote(session_id, safe='')}"))


ENDED = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


def _flag(value: bool) -> str:
    return "true" if value else "false"
