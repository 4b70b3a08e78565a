"""The job operations both fronts share: accept (check, store the input, record, queue), read, follow,
wait, cancel, end a session, fetch the output. Accepting a job means: the request is checked (bad input is
refused here with INVALID_ARGUMENT / 400, not turned into a failed job), its input image is stored in the
bucket, its record is written to Redis, and its task is queued. Only then does the client get the job
id, so an accepted job survives a gateway restart."""

from __future__ import annotations

import io
import logging
import time
import uuid
from typing import Iterator

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from PIL import Image
from prometheus_client import CollectorRegistry

from services.common.contracts import InputError, NoOutput, QueueFull, SessionNotFound
from services.common.images import MAX_IMAGE_BYTES
from services.common.protos import jobs_pb2
from services.common.storage import UPLOADS_PREFIX, ObjectNotFound, ObjectStore, StorageError, job_prefix
from services.orchestrator.heartbeat import live_workers
from services.orchestrator.gateway.streams import ClientStreams
from services.orchestrator.jobs import AsyncJobReader, JobStore
from services.orchestrator.metrics import GatewayMetrics
from services.orchestrator.plan import WORKFLOW_NAMES, JobPlan, check_request, check_session_id, plan_job
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.tasks import CONTROL_QUEUE, DELETE_SESSION_TASK, QUEUE, TASK

log = logging.getLogger("bagel.gateway")

RESULT_URL_TTL_S = 3600  # how long a presigned result URL stays valid
IMAGE_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(png: bytes, fmt: str, quality: int | None = None) -> bytes:
    """A stored PNG in another format: `quality` 0-100 for jpeg / webp (OpenAI's output_compression; a PNG
    is lossless and returned as stored)."""
    if fmt not in IMAGE_FORMATS:
        raise InputError(f"format: one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
    if quality is not None and not 0 <= quality <= 100:
        raise InputError(f"output_compression: in [0, 100], got {quality}")
    if fmt == "png":
        return png
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(out, format=fmt.upper(),
                                                    quality=quality if quality is not None else 90)
    return out.getvalue()


class Gateway:
    """The job operations, shared by the gRPC and HTTP fronts."""

    def __init__(self, jobs: JobStore, store: ObjectStore, celery: Celery, settings: OrchestratorSettings,
                 reader: AsyncJobReader | None = None):
        self.jobs, self.store, self.celery, self.settings = jobs, store, celery, settings
        # the HTTP front's asyncio view of the same records
        self.reader = reader or AsyncJobReader(settings.redis_url, ttl_seconds=settings.job_ttl_s)
        self.metrics: GatewayMetrics | None = None
        # open waiting requests per client, over both fronts
        self.streams = ClientStreams(settings.max_streams_per_client)

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = GatewayMetrics(registry, queue_depth=lambda: self.jobs.r.llen(QUEUE))

    def _count(self, req: jobs_pb2.SubmitJobRequest, result: str) -> None:
        if self.metrics is not None:
            self.metrics.submitted.labels(WORKFLOW_NAMES.get(req.workflow, "unknown"), result).inc()

    def submit(self, req: jobs_pb2.SubmitJobRequest) -> jobs_pb2.Job:
        return self._counted_submit(req, uuid.uuid4().hex)[0]

    def submit_planned(self, req: jobs_pb2.SubmitJobRequest) -> tuple[jobs_pb2.Job, JobPlan]:
        """Submit, and also return the plan it was checked with (its context size, say)."""
        job, _, plan = self._counted_submit(req, uuid.uuid4().hex, with_plan=True)
        return job, plan

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

    def _counted_submit(self, req: jobs_pb2.SubmitJobRequest, job_id: str, with_plan: bool = False):
        try:
            job, new, plan = self._submit(req, job_id)
        except Exception:
            self._count(req, "refused")
            raise
        self._count(req, "accepted" if new else "duplicate")
        return (job, new, plan) if with_plan else (job, new)

    def _submit(self, req: jobs_pb2.SubmitJobRequest, job_id: str) -> tuple[jobs_pb2.Job, bool, JobPlan]:
        check_request(req)  # the request's own fields first: a bad one is refused before the store is read
        image = req.image or None
        if req.image_key:
            image = self._read_upload(req.image_key)
        # every check the worker will make, before anything is accepted; the image is read from its header
        # only (the worker decodes it)
        plan = plan_job(req, image, decode=False)
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
            return created.job, False, plan
        try:
            self.celery.send_task(TASK, args=[created.job.id], queue=QUEUE)
        except Exception as e:  # noqa: BLE001 - the broker refused: the job must not look accepted
            self.jobs.fail(created.job.id, "UNAVAILABLE", f"could not queue the job: {e}")
            raise StorageError(f"the job queue is unreachable: {e}") from None
        log.info("job accepted", extra={"job_id": created.job.id,
                                        "workflow": jobs_pb2.Workflow.Name(req.workflow)})
        return created.job, True, plan

    def _read_upload(self, key: str) -> bytes:
        """The client's input object. Only keys under UPLOADS_PREFIX are read, and a key elsewhere gets the
        very answer of a missing one: a caller can neither read other jobs' objects nor learn which exist."""
        not_found = ObjectNotFound(f"image_key: no such input object (inputs are read from {UPLOADS_PREFIX}...)")
        if not key.startswith(UPLOADS_PREFIX):
            raise not_found
        try:
            return self.store.get_bytes(key, max_bytes=MAX_IMAGE_BYTES)
        except ObjectNotFound:
            raise not_found from None

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
        return self.result_image(job_id, "png")

    def workers(self) -> int:
        """How many workers are consuming the job queue (their heartbeats in Redis)."""
        return live_workers(self.jobs.r)

    def ready(self) -> str | None:
        """None when Redis accepts writes and the bucket answers (and, with BAGEL_READY_REQUIRES_WORKER, a
        worker consumes the queue), else what does not."""
        try:
            self.jobs.r.ping()
        except redis.RedisError as e:
            return f"redis: {e}"
        try:
            # A full Redis (maxmemory, noeviction) still answers PING but refuses every new job.
            self.jobs.writable()
        except redis.RedisError as e:
            return f"redis refuses writes: {e}"
        try:
            self.store.ensure_bucket()
        except StorageError as e:
            return f"object storage: {e}"
        if self.settings.ready_requires_worker and self.workers() == 0:
            return f"no worker is consuming the job queue ({QUEUE})"
        return None

    def _with_image(self, job: jobs_pb2.Job, inline: bool) -> jobs_pb2.Job:
        if job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.result.image_key:
            self.add_result_url(job)
            if inline:
                job.result.image_png = self.store.get_bytes(job.result.image_key)
        return job

    # ---- results as URLs and in other formats ----
    def add_result_url(self, job: jobs_pb2.Job) -> jobs_pb2.Job:
        """A finished image's download URL (see JobResult.image_url); presigning makes no network call."""
        url, expires_at = self.result_url(job.id, job.result.image_key, "png")
        job.result.image_url, job.result.image_url_expires_at = url, expires_at
        return job

    def result_url(self, job_id: str, key: str, fmt: str) -> tuple[str, float]:
        """A presigned GET URL for the stored object and its expiry, or the gateway's own (authenticated)
        result URL with expiry 0 when the store cannot presign."""
        if self.store.supports_presigned:
            ttl = RESULT_URL_TTL_S
            return self.store.presigned_get(key, ttl, response_content_type=IMAGE_FORMATS[fmt]), time.time() + ttl
        return f"/v1/jobs/{job_id}/result" + (f"?format={fmt}" if fmt != "png" else ""), 0.0

    def result_image(self, job_id: str, fmt: str = "png", quality: int | None = None) -> bytes:
        """The output image of a finished generate / edit job, encoded as asked."""
        job = self.jobs.get(job_id)
        if not job.result.image_key:
            raise NoOutput(f"job {job_id} has no image: it is {jobs_pb2.JobState.Name(job.state)}"
                           + ("" if job.workflow != jobs_pb2.WORKFLOW_UNDERSTAND else " (understand answers text)"))
        return encode_image(self.store.get_bytes(job.result.image_key), fmt, quality)

    def stored_result(self, job_id: str, fmt: str, quality: int | None = None) -> tuple[bytes, str, float]:
        """The image encoded as asked, kept beside the job's output (deleted with the job) so that a URL can
        name it: (bytes, url, expiry)."""
        data = self.result_image(job_id, fmt, quality)
        key = self.jobs.get(job_id).result.image_key
        if fmt != "png":
            key = job_prefix(job_id) + f"output-q{90 if quality is None else quality}.{fmt}"
            self.store.put_bytes(key, data, IMAGE_FORMATS[fmt])
        url, expires_at = self.result_url(job_id, key, fmt)
        if not self.store.supports_presigned and quality is not None and fmt != "png":
            url += ("&" if "?" in url else "?") + f"quality={quality}"
        return data, url, expires_at
