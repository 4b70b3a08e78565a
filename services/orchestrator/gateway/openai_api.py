"""The OpenAI-compatible API: `/v1/images/generations`, `/v1/images/edits`, `/v1/chat/completions`,
`/v1/models`. Every request becomes one or more jobs of the job system (durable, counted, limited,
authenticated, cancellable), submitted through the same Gateway operations as the job API; the reply
waits for them on asyncio. A client that hangs up on a synchronous call cancels its jobs.

BAGEL's own parameters travel as extra fields (`seed`, `num_inference_steps`, `guidance_scale`,
`image_guidance_scale`, `cfg_interval`, `cfg_renorm_type`, `cfg_renorm_min`, `timestep_shift`, `think`,
and `session_id` for chat). What differs from OpenAI's API is listed in docs/openai.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from services.common.contracts import (ANSWER_TOKENS, DeadlineExceeded, HTTP_FOR_CODE, InputError, messages, NotFound,
                                       partial_think_end, ServiceError, THINK_END, THINK_TOKENS, TooLarge)
from services.common.images import MAX_IMAGE_BYTES
from services.common.protos import jobs_pb2
from services.orchestrator.gateway.openai_errors import openai_error
from services.orchestrator.gateway.operations import Gateway
from services.orchestrator.jobs import is_terminal

SYNC_TIMEOUT_S = 600.0  # a synchronous call waits this long for its jobs (OpenAI's SDK waits as long)
MAX_IMAGES_PER_CALL = 4


# ---- request bodies ------------------------------------------------------------------------------------
class ImageOptions(BaseModel):
    """What an image request can set: OpenAI's fields and BAGEL's extras."""

    model_config = ConfigDict(extra="ignore")  # fields other servers take (quality, style...) are ignored

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_CALL, description="images, run as n jobs with seeds seed..seed+n-1")
    size: str | None = Field("auto", description="WxH (multiples of 16, at most 1024) or auto")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg / webp quality")
    user: str | None = None
    # BAGEL's parameters
    seed: int | None = Field(None, ge=0, le=2 ** 62)
    num_inference_steps: int | None = Field(None, description="timesteps (the reference's num_timesteps)")
    guidance_scale: float | None = Field(None, description="cfg_text_scale")
    image_guidance_scale: float | None = Field(None, description="cfg_img_scale")
    cfg_interval: tuple[float, float] | None = None
    cfg_renorm_type: Literal["global", "channel", "text_channel"] | None = None
    cfg_renorm_min: float | None = None
    timestep_shift: float | None = None
    think: bool = False


class ChatRequest(ImageOptions):
    """A chat completion; with `modalities: ["image"]` the answer is an image (generated, or an edit of the
    message's image), as vLLM-Omni serves BAGEL."""

    prompt: str = ""  # not a chat field: the prompt comes from `messages`
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=10, description="0 or unset: greedy (BAGEL's default)")
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    modalities: list[Literal["text", "image"]] | None = None
    session_id: str | None = Field(None, description="continue a conversation kept by the LLM service")
    session_resume: bool = Field(False, description="a later turn of `session_id`: fail (409) when the LLM "
                                 "service no longer has it, instead of answering as a new conversation")


# ---- the router --------------------------------------------------------------------------------------------
def openai_router(g: Gateway) -> APIRouter:
    router = APIRouter(tags=["OpenAI-compatible"])
    model_name = g.settings.model_name

    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise NotFound(f"model {model!r} is not served here; this deployment serves {model_name!r}")

    @router.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(model_name)]}

    @router.get("/v1/models/{model}")
    async def get_model(model: str):
        check_model(model)
        return _model_card(model_name)

    @router.post("/v1/images/generations")
    async def generations(request: Request, body: ImageOptions):
        check_model(body.model)
        req = _image_job(jobs_pb2.WORKFLOW_GENERATE, body)
        return await _images_reply(g, request, body, req)

    @router.post("/v1/images/edits", openapi_extra=_MULTIPART_DOC)
    async def edits(request: Request):
        body, image = await _read_edit_form(request)
        check_model(body.model)
        req = _image_job(jobs_pb2.WORKFLOW_EDIT, body)
        req.image = image
        return await _images_reply(g, request, body, req)

    @router.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest):
        check_model(body.model)
        req = _chat_job(body)
        if body.stream:
            return await _chat_stream(g, request, body, req)
        return await _chat_reply(g, request, body, req)

    return router


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "bagel-serve"}


# ---- requests -> jobs ----------------------------------------------------------------------------------------
def _image_job(workflow: int, o: ImageOptions) -> jobs_pb2.SubmitJobRequest:
    req = jobs_pb2.SubmitJobRequest(workflow=workflow, prompt=o.prompt, think=o.think)
    p = req.image_params
    if o.size and o.size != "auto":
        try:
            width, height = (int(v) for v in o.size.lower().split("x"))
        except ValueError:
            raise InputError(f"size: WxH or auto, got {o.size!r}") from None
        p.width, p.height = width, height
    for field, value in (("num_timesteps", o.num_inference_steps), ("cfg_text_scale", o.guidance_scale),
                         ("cfg_img_scale", o.image_guidance_scale), ("cfg_renorm_min", o.cfg_renorm_min),
                         ("timestep_shift", o.timestep_shift)):
        if value is not None:
            setattr(p, field, value)
    if o.cfg_interval is not None:
        p.cfg_interval_lo, p.cfg_interval_hi = o.cfg_interval
    if o.cfg_renorm_type is not None:
        p.cfg_renorm_type = messages.RENORM_ENUMS[o.cfg_renorm_type]
    return req


def _chat_job(body: ChatRequest) -> jobs_pb2.SubmitJobRequest:
    prompt, image = _read_messages(body.messages, body.session_id is not None)
    wants_image = body.modalities is not None and "image" in body.modalities
    if wants_image:
        workflow = jobs_pb2.WORKFLOW_EDIT if image is not None else jobs_pb2.WORKFLOW_GENERATE
        req = _image_job(workflow, body.model_copy(update={"prompt": prompt}))
        if body.n != 1:
            raise InputError("n: one image per chat completion (use /v1/images/generations for more)")
    else:
        req = jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_UNDERSTAND, prompt=prompt, think=body.think)
        if body.n != 1:
            raise InputError("n: one choice per completion")
    budget = body.max_completion_tokens or body.max_tokens
    if budget is not None:
        req.text_params.max_new_tokens = budget
    if body.temperature:  # sampling; unset or 0 is greedy decoding
        req.text_params.do_sample, req.text_params.temperature = True, body.temperature
    if body.top_p is not None:
        req.text_params.top_p = body.top_p
    if body.seed is not None:
        if wants_image:
            req.image_params.seed = body.seed
        req.text_params.seed = body.seed
    if image is not None:
        req.image = image
    if body.session_id:
        req.session_id = body.session_id
    req.session_resume = body.session_resume  # without session_id: refused as the job API refuses it
    return req


def _read_messages(msgs: list[dict[str, Any]], in_session: bool) -> tuple[str, bytes | None]:
    """One user message (text parts and at most one image as a data URL) -> (prompt, image bytes)."""
    if not msgs:
        raise InputError("messages: at least one message is needed")
    roles = [m.get("role") for m in msgs]
    if roles != ["user"]:
        raise InputError("messages: send one user message; a conversation continues with `session_id` "
                         f"(the LLM service keeps its context), got roles {roles}")
    content = msgs[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise InputError("messages[0].content: a string or a list of parts")
    texts, images = [], []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(_data_url(str(url or ""), f"messages[0].content[{i}].image_url"))
        else:
            raise InputError(f"messages[0].content[{i}]: a `text` or `image_url` part, got {kind!r}")
    if len(images) > 1:
        raise InputError("messages: at most one image per request")
    return "\n".join(texts), (images[0] if images else None)


def _data_url(url: str, where: str) -> bytes:
    """The bytes of a `data:image/...;base64,` URL. The gateway fetches nothing from the network."""
    head, sep, data = url.partition(",")
    if not url.startswith("data:") or not sep or not head.endswith(";base64"):
        raise InputError(f"{where}: only base64 data URLs (data:image/png;base64,...) are taken; the gateway "
                         "does not fetch images from other URLs")
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise TooLarge(f"{where}: the image is over {MAX_IMAGE_BYTES} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: not valid base64") from None


async def _read_edit_form(request: Request) -> tuple[ImageOptions, bytes]:
    """multipart/form-data as the OpenAI SDK sends an edit: `image` (or `image[]`) file, the rest fields."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InputError("images/edits takes multipart/form-data (an `image` file and the fields)")
    form = await request.form(max_files=4, max_fields=64)
    uploads = [v for k, v in form.multi_items() if k in ("image", "image[]")]
    if "mask" in form:
        raise InputError("mask: not supported (BAGEL edits the whole image from the prompt)")
    if len(uploads) != 1 or not isinstance(uploads[0], UploadFile):
        raise InputError(f"image: exactly one image file is needed, got {len(uploads)}")
    if (uploads[0].size or 0) > MAX_IMAGE_BYTES:
        raise TooLarge(f"image: {uploads[0].size} bytes; the limit is {MAX_IMAGE_BYTES}")
    fields: dict[str, Any] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    if "cfg_interval" in fields:
        try:
            fields["cfg_interval"] = json.loads(fields["cfg_interval"])
        except ValueError:
            raise InputError("cfg_interval: a JSON list [lo, hi]") from None
    try:
        body = ImageOptions.model_validate(fields)
    except ValidationError as e:
        raise InputError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
    return body, await uploads[0].read()


# ---- waiting ---------------------------------------------------------------------------------------------------
async def _submit(g: Gateway, req: jobs_pb2.SubmitJobRequest):
    return await run_in_threadpool(g.submit_planned, req)


async def _wait_all(g: Gateway, request: Request, job_ids: list[str]) -> list[jobs_pb2.Job]:
    """The jobs once all have ended. A client that hangs up, or a wait past SYNC_TIMEOUT_S, cancels them."""
    async def connected() -> bool:
        return not await request.is_disconnected()

    try:
        jobs = await asyncio.gather(*(g.reader.wait(i, SYNC_TIMEOUT_S, still_wanted=connected) for i in job_ids))
    except BaseException:
        _cancel_soon(g, job_ids)
        raise
    if not all(is_terminal(j) for j in jobs):
        _cancel_soon(g, job_ids)
        if await request.is_disconnected():
            raise asyncio.CancelledError()  # nobody to answer
        raise DeadlineExceeded(f"not finished within {SYNC_TIMEOUT_S:.0f} s; cancelled")
    for job in jobs:
        if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            raise JobFailed.of(job)
    return jobs


def _cancel_soon(g: Gateway, job_ids: list[str]) -> None:
    """Cancel in the thread pool without waiting: this may run while the request's task is being cancelled."""
    loop = asyncio.get_running_loop()
    for job_id in job_ids:
        loop.run_in_executor(None, _cancel_quietly, g, job_id)


def _cancel_quietly(g: Gateway, job_id: str) -> None:
    try:
        g.cancel(job_id)
    except Exception:  # noqa: BLE001 - the job may be gone already
        pass


class JobFailed(ServiceError):
    """A job behind an OpenAI call failed: the call answers with the job's own status and message."""

    def __init__(self, message: str, code: str = "INTERNAL"):
        super().__init__(message)
        self.grpc_code, self.http_status = code, HTTP_FOR_CODE.get(code, 500)

    @classmethod
    def of(cls, job: jobs_pb2.Job) -> "JobFailed":
        return cls(job.error.message or jobs_pb2.JobState.Name(job.state), job.error.code or "INTERNAL")


# ---- replies --------------------------------------------------------------------------------------------------------
async def _images_reply(g: Gateway, request: Request, o: ImageOptions, req: jobs_pb2.SubmitJobRequest):
    base = o.seed if o.seed is not None else secrets.randbits(62)
    submitted = []
    try:
        for i in range(o.n):
            one = jobs_pb2.SubmitJobRequest()
            one.CopyFrom(req)
            one.image_params.seed = base + i
            submitted.append((await _submit(g, one))[0].id)
    except BaseException:
        _cancel_soon(g, submitted)
        raise
    jobs = await _wait_all(g, request, submitted)
    data = []
    for job in jobs:
        item: dict[str, Any] = {"seed": job.result.seed, "revised_prompt": None}
        if o.response_format == "b64_json":
            png = await run_in_threadpool(g.result_image, job.id, o.output_format, o.output_compression)
            item["b64_json"] = base64.b64encode(png).decode()
        else:
            _, url, expires_at = await run_in_threadpool(g.stored_result, job.id, o.output_format,
                                                         o.output_compression)
            item["url"] = url if "://" in url else str(request.base_url).rstrip("/") + url
            if expires_at:
                item["expires_at"] = int(expires_at)
        if job.result.think:
            item["think"] = job.result.think
        data.append(item)
    w, h = jobs[0].result.width, jobs[0].result.height
    return {"created": int(time.time()), "data": data, "output_format": o.output_format, "size": f"{w}x{h}"}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _budget(req: jobs_pb2.SubmitJobRequest) -> int:
    if req.text_params.HasField("max_new_tokens"):
        return req.text_params.max_new_tokens
    return THINK_TOKENS if req.think else ANSWER_TOKENS


async def _chat_reply(g: Gateway, request: Request, body: ChatRequest, req: jobs_pb2.SubmitJobRequest):
    job, plan = await _submit(g, req)
    (job,) = await _wait_all(g, request, [job.id])
    r = job.result
    message: dict[str, Any] = {"role": "assistant"}
    if r.image_key:
        png = await run_in_threadpool(g.result_image, job.id, "png")
        message["content"] = [{"type": "image_url",
                               "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}]
        completion = 0
    else:
        message["content"] = r.text
        completion = r.tokens
    message["reasoning_content"] = r.think or None
    finish = "length" if not r.image_key and r.tokens >= _budget(req) else "stop"
    return {"id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": int(job.created_at),
            "model": body.model, "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                              "logprobs": None}],
            "usage": _usage(plan.context_tokens, completion)}


async def _chat_stream(g: Gateway, request: Request, body: ChatRequest, req: jobs_pb2.SubmitJobRequest):
    """chat.completion.chunk events: the reasoning (think) and the answer as they are decoded, then the
    finish reason, the usage when asked (`stream_options.include_usage`), and `[DONE]`."""
    job, plan = await _submit(g, req)
    chunk_id, created = f"chatcmpl-{job.id}", int(job.created_at)
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        out = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []}
        if usage is not None:
            out["usage"] = usage
        return f"data: {json.dumps(out)}\n\n"

    async def events():
        split = _ThinkSplit(think=req.think)
        ended = False
        last_sent = time.monotonic()
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for update in g.reader.watch(job.id, SYNC_TIMEOUT_S, idle=True):
                if update is None:
                    if time.monotonic() - last_sent >= 15:
                        last_sent = time.monotonic()
                        yield ": keep-alive\n\n"
                    continue
                if is_terminal(update):
                    ended = True
                    job_now = update
                    break
                if update.progress.stage in ("think", "answer") and update.progress.text:
                    for delta in split.update(update.progress.text):
                        last_sent = time.monotonic()
                        yield chunk(delta)
            if not ended:
                _cancel_soon(g, [job.id])
                yield _stream_error(DeadlineExceeded(f"not finished within {SYNC_TIMEOUT_S:.0f} s; cancelled"))
                return
            if job_now.state != jobs_pb2.JOB_STATE_SUCCEEDED:
                yield _stream_error(JobFailed.of(job_now))
                return
            r = job_now.result
            if r.image_key:
                png = await run_in_threadpool(g.result_image, job.id, "png")
                url = "data:image/png;base64," + base64.b64encode(png).decode()
                for delta in split.finish(r.think or "", ""):
                    yield chunk(delta)
                yield chunk({"content": [{"type": "image_url", "image_url": {"url": url}}]})
                completion = 0
            else:
                for delta in split.finish(r.think or "", r.text):
                    yield chunk(delta)
                completion = r.tokens
            finish = "length" if not r.image_key and r.tokens >= _budget(req) else "stop"
            yield chunk({}, finish)
            if include_usage:
                yield chunk({}, usage=_usage(plan.context_tokens, completion), choices=False)
            yield "data: [DONE]\n\n"
            ended = True
        finally:
            if not ended:  # the client went away mid-stream
                _cancel_soon(g, [job.id])

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _stream_error(exc: ServiceError) -> str:
    status = exc.http_status
    return f"data: {json.dumps(openai_error(exc.grpc_code, str(exc), status))}\n\n"


class _ThinkSplit:
    """The decoded text so far -> `reasoning_content` / `content` deltas. With think, text before `</think>`
    is reasoning (the `<think>` tag dropped) and after it the answer; without, all of it is the answer.
    Text that may still change is held back (an undecoded U+FFFD; with think, a trailing partial `</think>`
    and the surrounding whitespace the result strips), and finish() sends what the job's result has beyond what was
    sent, so the concatenated stream equals the non-streamed answer."""

    def __init__(self, think: bool):
        self.think = think
        self.sent = {"reasoning_content": "", "content": ""}

    def update(self, text: str) -> list[dict]:
        text = text.rstrip("\ufffd")
        if not self.think:  # the answer is the decoded text as it is
            return self._emit("content", text, final=True)
        head, tag, tail = text.partition(THINK_END)
        if not tag:
            head = head[:len(head) - partial_think_end(head)]
        out = self._emit("reasoning_content", head.replace("<think>", "").strip())
        if tag:
            out += self._emit("content", tail.strip())
        return out

    def finish(self, reasoning: str, answer: str) -> list[dict]:
        return self._emit("reasoning_content", reasoning, final=True) + self._emit("content", answer, final=True)

    def _emit(self, field: str, target: str, final: bool = False) -> list[dict]:
        sent = self.sent[field]
        if not final:
            target = target.rstrip()  # trailing whitespace may yet be stripped away
        if len(target) <= len(sent) or not target.startswith(sent):
            return []  # nothing new (or the decoder rewrote earlier text: the result is the truth)
        self.sent[field] = target
        return [{field: target[len(sent):]}]



_MULTIPART_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {"image": {"type": "string", "format": "binary"}, "prompt": {"type": "string"},
                   **{k: v for k, v in ImageOptions.model_json_schema()["properties"].items() if k != "prompt"}},
}}}}}
