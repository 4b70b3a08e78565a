"""The job operations both fronts share: accept (check, store the input, record, queue), read, follow,
wait, cancel, end a session, fetch the output. Accepting a job means: the request is checked (bad input is
refused here with INVALID_ARGUMENT / 400, not turned into a failed job), its input image is stored in the
bucket, its record is written to Redis, and its task is queued. Only then does the client get the job
id, so an accepted job survives a gateway restart."""

from __future__ import annotations

import logging
import uuid
from typing import Iterator

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from prometheus_client import CollectorRegistry

from services.common.contracts import NoOutput, QueueFull, SessionNotFound
from services.common.images import MAX_IMAGE_BYTES
from services.common.protos import jobs_pb2
from services.common.storage import ObjectStore, StorageError, job_prefix
from services.orchestrator.jobs import JobStore
from services.orchestrator.metrics import GatewayMetrics
from services.orchestrator.plan import WORKFLOW_NAMES, check_session_id, plan_job
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.tasks import CONTROL_QUEUE, DELETE_SESSION_TASK, QUEUE, TASK

log = logging.getLogger("bagel.gateway")


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
