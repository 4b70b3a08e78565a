"""The client's data: requests built from plain arguments, and jobs, progress events and results read
from the `bagel.v1` messages (both transports decode into the same proto first, then into these)."""

from __future__ import annotations

import enum
import io
import os
from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image

from services.common.protos import jobs_pb2, llm_pb2

ImageInput = Union[Image.Image, bytes, bytearray, str, os.PathLike]


class JobState(str, enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    UNSPECIFIED = "UNSPECIFIED"

    @property
    def ended(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @classmethod
    def from_proto(cls, value: int) -> "JobState":
        return cls(jobs_pb2.JobState.Name(value).removeprefix("JOB_STATE_"))


class Workflow(str, enum.Enum):
    UNDERSTAND = "understand"
    GENERATE = "generate"
    EDIT = "edit"

    @property
    def proto(self) -> int:
        return jobs_pb2.Workflow.Value(f"WORKFLOW_{self.name}")


@dataclass(frozen=True)
class Progress:
    """One change of a job as `watch` reports it. `stage` is queued, encode, think, answer, denoise or
    decode; `step` / `total` count tokens or denoising steps; `text` is the text decoded so far."""

    job_id: str
    state: JobState
    stage: str
    step: int
    total: int
    text: str
    job: "Job" = field(repr=False, compare=False)


@dataclass(frozen=True)
class TextResult:
    """understand's answer; `think` is the plan when asked for (else "")."""

    text: str
    think: str
    tokens: int


@dataclass(frozen=True)
class ImageResult:
    """The image of generate / edit, with the seed that made it (reuse it to reproduce the image)."""

    image: Image.Image
    seed: int | None
    think: str
    width: int
    height: int


@dataclass
class Job:
    """A snapshot of a job, and a handle on it: `wait()`, `result()`, `watch()`, `cancel()` and `refresh()`
    go through the client that made it (with an AsyncClient they are awaited / async-iterated)."""

    id: str
    workflow: str
    state: JobState
    stage: str = ""
    step: int = 0
    total: int = 0
    text: str = ""
    error_code: str = ""
    error_message: str = ""
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    deadline_at: float = 0.0
    attempts: int = 0
    proto: Any = field(default=None, repr=False, compare=False)  # the jobs_pb2.Job it was read from
    _client: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: "jobs_pb2.Job", client: Any = None) -> "Job":
        return cls(id=msg.id, workflow=jobs_pb2.Workflow.Name(msg.workflow).removeprefix("WORKFLOW_").lower(),
                   state=JobState.from_proto(msg.state), stage=msg.progress.stage, step=msg.progress.step,
                   total=msg.progress.total, text=msg.progress.text, error_code=msg.error.code,
                   error_message=msg.error.message, created_at=msg.created_at, started_at=msg.started_at,
                   finished_at=msg.finished_at, deadline_at=msg.deadline_at, attempts=msg.attempts, proto=msg,
                   _client=client)

    @property
    def ended(self) -> bool:
        return self.state.ended

    def progress(self) -> Progress:
        return Progress(self.id, self.state, self.stage, self.step, self.total, self.text, self)

    # Handle methods: the client does the work.
    def refresh(self):
        return self._client.get(self.id)

    def wait(self, timeout: float | None = None):
        return self._client.wait(self.id, timeout=timeout)

    def result(self, timeout: float | None = None):
        return self._client.result(self.id, timeout=timeout)

    def watch(self):
        return self._client.watch(self.id)

    def cancel(self):
        return self._client.cancel(self.id)


def read_image(image: ImageInput) -> bytes:
    """Encoded bytes for the request: a PIL image as PNG, bytes as they are, a path's file content."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:  # FileNotFoundError as is: the caller named a file that is not there
            return f.read()
    raise TypeError(f"image: a PIL image, bytes or a path, got {type(image).__name__}")


_RENORM = {"global": llm_pb2.CFG_RENORM_TYPE_GLOBAL, "channel": llm_pb2.CFG_RENORM_TYPE_CHANNEL,
           "text_channel": llm_pb2.CFG_RENORM_TYPE_TEXT_CHANNEL}


def build_request(workflow: Workflow, prompt: str, *, image: ImageInput | None = None, image_key: str = "",
                  think: bool = False, width: int | None = None, height: int | None = None,
                  steps: int | None = None, seed: int | None = None, cfg_text_scale: float | None = None,
                  cfg_img_scale: float | None = None, cfg_interval: tuple[float, float] | None = None,
                  cfg_renorm_type: str | None = None, cfg_renorm_min: float | None = None,
                  timestep_shift: float | None = None, max_new_tokens: int | None = None,
                  do_sample: bool | None = None, temperature: float | None = None, top_p: float | None = None,
                  session: str | None = None, session_ttl_s: int | None = None, session_resume: bool = False,
                  idempotency_key: str | None = None, deadline_s: float | None = None,
                  inline_image: bool = False) -> jobs_pb2.SubmitJobRequest:
    """A SubmitJobRequest; arguments left None take the server's defaults (the gateway checks ranges)."""
    req = jobs_pb2.SubmitJobRequest(workflow=workflow.proto, prompt=prompt, think=think,
                                    inline_image=inline_image, image_key=image_key,
                                    session_id=session or "", session_resume=session_resume,
                                    idempotency_key=idempotency_key or "")
    if image is not None:
        req.image = read_image(image)
    if session_ttl_s is not None:
        req.session_ttl_seconds = int(session_ttl_s)
    if deadline_s is not None:
        # Whole seconds on the wire; round up so a deadline is never shorter than asked.
        req.deadline_seconds = max(1, int(-(-float(deadline_s) // 1)))
    ip = req.image_params
    for name, value in (("width", width), ("height", height), ("num_timesteps", steps), ("seed", seed),
                        ("cfg_text_scale", cfg_text_scale), ("cfg_img_scale", cfg_img_scale),
                        ("cfg_renorm_min", cfg_renorm_min), ("timestep_shift", timestep_shift)):
        if value is not None:
            setattr(ip, name, value)
    if cfg_interval is not None:
        ip.cfg_interval_lo, ip.cfg_interval_hi = cfg_interval
    if cfg_renorm_type is not None:
        if cfg_renorm_type not in _RENORM:
            from bagel_serve.client.errors import InvalidArgument

            raise InvalidArgument(f"cfg_renorm_type: one of {sorted(_RENORM)}, got {cfg_renorm_type!r}")
        ip.cfg_renorm_type = _RENORM[cfg_renorm_type]
    tp = req.text_params
    for name, value in (("max_new_tokens", max_new_tokens), ("do_sample", do_sample),
                        ("temperature", temperature), ("top_p", top_p)):
        if value is not None:
            setattr(tp, name, value)
    if workflow is Workflow.UNDERSTAND and seed is not None:
        tp.seed = seed  # understand's seed is the sampling seed
        req.ClearField("image_params")
    return req


def result_of(job: Job) -> TextResult | ImageResult:
    """The result of a SUCCEEDED job whose message carries the PNG inline (image workflows)."""
    r = job.proto.result
    if job.workflow == Workflow.UNDERSTAND.value:
        return TextResult(text=r.text, think=r.think, tokens=r.tokens)
    image = Image.open(io.BytesIO(r.image_png))
    image.load()
    return ImageResult(image=image, seed=r.seed if r.HasField("seed") else None, think=r.think,
                       width=r.width, height=r.height)
