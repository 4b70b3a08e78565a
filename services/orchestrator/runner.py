"""What a Celery worker does with one job: claim it, run its workflow through the model services, record
the outcome. Kept apart from the Celery wiring (celery_app.py) so the rules read in one place:

- One worker at a time per job: a lease in Redis, renewed while the job runs. A second delivery of the
  same message (the broker redelivers unacknowledged messages after the visibility timeout) finds the
  lease held and waits: for the job to end, or for the lease to lapse because its worker died, and
  then takes the job over. Sooner than that, the janitor (janitor.py) queues a job whose lease lapsed
  again. A worker that finds its own lease lost (it stalled) stops working on the job without ending it.
  Nothing goes back through a delayed message, so nothing can get lost there.
- Every failure ends the job with a status code, except transient ones (a model service restarting,
  storage unreachable), which show the job QUEUED again and retry it up to `max_retries` times with
  backoff, in the same worker.
- Cancellation asked through the gateway is seen within half a second and stops the workflow at its
  next step (the LLM stream is cancelled, freeing its KV blocks at once).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from functools import cached_property
from typing import Callable

import grpc
import numpy as np

from services.common.contracts import Cancelled, Controls, JobNotFound, Progress, ServiceError
from services.common.protos import jobs_pb2
from services.common.storage import ObjectNotFound, ObjectStore, StorageConfig, StorageError, job_prefix
from services.orchestrator import workflows as wf
from services.orchestrator.janitor import Janitor, Sweep
from services.orchestrator.jobs import STATE_NAMES, JobStore, is_terminal, late_message
from services.orchestrator.metrics import WorkerMetrics
from services.orchestrator.plan import WORKFLOW_NAMES, JobPlan, plan_job
from services.orchestrator.remote import remote_clients
from services.orchestrator.settings import OrchestratorSettings

log = logging.getLogger("bagel.worker")

# Worth another attempt: the service may be restarting, overloaded, or briefly unreachable.
TRANSIENT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
PROGRESS_INTERVAL_S = 0.2  # at most this often per job, besides stage changes and the last step


class Transient(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Runtime:
    """A worker process's connections, made on first use."""

    def __init__(self, settings: OrchestratorSettings, storage: StorageConfig | None = None,
                 metrics: WorkerMetrics | None = None):
        self.settings = settings
        self._storage = storage
        self.metrics = metrics or WorkerMetrics()

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore.from_url(self.settings.redis_url, ttl_seconds=self.settings.job_ttl_s)

    @cached_property
    def store(self) -> ObjectStore:
        cfg = self._storage or StorageConfig.from_env()
        if cfg is None:
            raise RuntimeError("the orchestrator needs object storage: set BAGEL_S3_ENDPOINT and its credentials")
        return ObjectStore(cfg)

    def janitor(self, requeue: Callable[[str], None]) -> Janitor:
        def count(sweep: Sweep) -> None:
            self.metrics.rescued.inc(len(sweep.rescued) + len(sweep.resent))
            self.metrics.objects_deleted.inc(sweep.objects)

        s = self.settings
        return Janitor(self.jobs, self.store, requeue, on_sweep=count, requeue_after_s=s.requeue_s,
                       max_age_s=s.max_age_s)


def execute(job_id: str, rt: Runtime) -> None:
    """Run the job to its end (or leave it to the worker that owns it)."""
    if not _still_to_run(job_id, rt.jobs):
        return
    worker = _acquire_lease(job_id, rt)
    if worker is None:
        return
    watcher = Watcher(rt.jobs, job_id, worker, rt.settings.lease_s, deadline_at=rt.jobs.get(job_id).deadline_at)
    watcher.start()
    rt.metrics.running.inc()
    try:
        _run_attempts(job_id, rt, watcher)
    except Exception as e:  # noqa: BLE001 - a job must end, whatever broke
        _end_failed(job_id, rt, watcher, e)
    finally:
        watcher.stop()
        rt.jobs.release_lease(job_id, worker)
        rt.metrics.running.dec()
        _after_end(rt, job_id)


def _still_to_run(job_id: str, jobs: JobStore) -> bool:
    try:
        job = jobs.get(job_id)
    except JobNotFound:
        log.warning("job record gone; dropping its message", extra={"job_id": job_id})
        return False
    return not is_terminal(job)  # else: a redelivery of a finished job


def _acquire_lease(job_id: str, rt: Runtime) -> str | None:
    """This worker's id once it holds the job's lease; None when the job ended (or vanished) meanwhile.
    While another worker holds it (a second delivery of the message) wait: for the job to end, or for
    that worker's lease to lapse because it died, and take the job over then."""
    jobs, lease_s = rt.jobs, rt.settings.lease_s
    worker = uuid.uuid4().hex[:12]
    while not jobs.acquire_lease(job_id, worker, lease_s):
        time.sleep(min(5.0, lease_s / 3))
        try:
            if is_terminal(jobs.get(job_id)):
                return None
        except JobNotFound:
            return None
    return worker


def _run_attempts(job_id: str, rt: Runtime, watcher: "Watcher") -> None:
    """Attempts until the job succeeds, fails for good (raises), ends elsewhere or leaves this worker."""
    while not watcher.lost.is_set():  # lost: the janitor gave the job to another worker
        job = rt.jobs.start(job_id)
        if job is None:
            return  # ended meanwhile (cancelled while waiting to retry, say)
        log.info("job started", extra={"job_id": job_id, "attempt": job.attempts})
        try:
            result = run(job_id, rt, watcher.controls)
        except Transient as e:
            if not _wait_to_retry(job, e, rt, watcher):
                return
            continue
        rt.jobs.succeed(job_id, result)
        log.info("job succeeded", extra={"job_id": job_id})
        return


def _wait_to_retry(job: jobs_pb2.Job, e: "Transient", rt: Runtime, watcher: "Watcher") -> bool:
    """After a transient failure: False when the job failed for good (too many attempts), else True once
    the backoff has passed (or a cancellation cut it short)."""
    s = rt.settings
    if job.attempts > s.max_retries:
        rt.jobs.fail(job.id, e.code, f"{e} (after {job.attempts} attempts)")
        return False
    # Wait here, lease held and renewed, rather than through a delayed message: the job stays owned, a
    # cancellation ends the wait, and a worker that dies meanwhile is covered like one that dies mid-run
    # (the janitor, or the redelivery of the unacknowledged message).
    delay = min(60.0, s.retry_backoff_s * 2 ** (job.attempts - 1))
    rt.jobs.requeue(job.id, f"{e.code}: {e}")
    rt.metrics.retries.labels(e.code).inc()
    log.warning("job retried", extra={"job_id": job.id, "code": e.code, "in_s": delay})
    watcher.controls.cancel.wait(delay)
    return True


def _end_failed(job_id: str, rt: Runtime, watcher: "Watcher", e: Exception) -> None:
    if watcher.lost.is_set():
        # This worker stalled past its lease and the job was queued again: the new owner ends it.
        log.warning("job given up: its lease was lost", extra={"job_id": job_id})
        return
    code, message = _failure(e)
    if watcher.late.is_set():
        code, message = "DEADLINE_EXCEEDED", late_message(rt.jobs.get(job_id))
    if code == "INTERNAL":
        log.exception("job failed", extra={"job_id": job_id})
    rt.jobs.fail(job_id, code, message)


def delete_session(session_id: str, rt: Runtime) -> bool:
    """End a session on the LLM service; False when it had no such session."""
    s = rt.settings
    clients = remote_clients(s.vit_addr, s.vae_addr, s.llm_addr, token=s.auth_token, timeout=30)
    try:
        return clients.llm.delete_session(session_id)
    finally:
        clients.close()


def _failure(e: Exception) -> tuple[str, str]:
    """The status code and message a job ends with: what the error declares (contracts/errors.py), or the
    service's status. Anything else is a bug here (INTERNAL, logged with its traceback), including a plain
    ValueError, which the gRPC layer would have read as the caller's fault."""
    if isinstance(e, Cancelled):
        return "CANCELLED", "cancelled"
    if isinstance(e, ServiceError):
        return e.grpc_code, str(e)
    if isinstance(e, grpc.RpcError):
        return e.code().name, e.details() or e.code().name
    return "INTERNAL", f"{type(e).__name__}: {e}"


def _after_end(rt: Runtime, job_id: str) -> None:
    """Metrics, and the job's objects other than its output deleted (the janitor deletes the output when
    the record expires). Best effort: the job's outcome is already recorded."""
    try:
        job = rt.jobs.get(job_id)
    except Exception:  # noqa: BLE001
        return
    if not is_terminal(job):
        return  # another worker owns it now
    workflow, state = WORKFLOW_NAMES.get(job.workflow, "unknown"), STATE_NAMES[job.state]
    rt.metrics.finished.labels(workflow, state).inc()
    if job.started_at:
        rt.metrics.seconds.labels(workflow, state).observe(job.finished_at - job.started_at)
    try:
        keep = {job.result.image_key} if job.result.image_key else set()
        rt.metrics.objects_deleted.inc(rt.store.delete_prefix(job_prefix(job_id), keep=keep))
    except Exception:  # noqa: BLE001 - left for the janitor, once the record expires
        log.warning("job objects not deleted", exc_info=True, extra={"job_id": job_id})


def run(job_id: str, rt: Runtime, controls: Controls) -> jobs_pb2.JobResult:
    """Run the job's workflow; transient service and storage failures become Transient."""
    s = rt.settings
    req = rt.jobs.request(job_id)
    try:
        image = rt.store.get_bytes(req.image_key) if req.image_key else None
        plan = plan_job(req, image)
        clients = remote_clients(s.vit_addr, s.vae_addr, s.llm_addr, store=rt.store, token=s.auth_token,
                                 timeout=s.call_timeout_s, job_id=job_id)
        try:
            return _run_plan(plan, clients, controls, rt.store, job_id)
        finally:
            clients.close()
    except grpc.RpcError as e:
        if e.code() in TRANSIENT_CODES:
            raise Transient(e.code().name, e.details() or e.code().name) from None
        raise
    except ObjectNotFound:
        raise
    except StorageError as e:
        raise Transient("UNAVAILABLE", str(e)) from None


def _run_plan(plan: JobPlan, clients, controls: Controls, store: ObjectStore, job_id: str) -> jobs_pb2.JobResult:
    if plan.workflow == "understand":
        out = wf.understand(clients, plan.image, plan.prompt, plan.text_params, plan.think, controls, plan.session)
        return jobs_pb2.JobResult(text=out.text, think=out.think or "", tokens=out.tokens)
    clients.vae = _ReportingVAE(clients.vae, controls)
    if plan.workflow == "generate":
        out = wf.generate(clients, plan.prompt, plan.image_params, plan.think, plan.text_params, controls,
                          plan.session)
    else:
        out = wf.edit(clients, plan.image, plan.prompt, plan.image_params, plan.think, plan.text_params, controls,
                      plan.session)
    controls.check()
    key = job_prefix(job_id) + "output.png"
    store.put_png(key, out.pixels)
    h, w = out.pixels.shape[:2]
    result = jobs_pb2.JobResult(image_key=key, width=w, height=h, think=out.think or "")
    if out.seed is not None:
        result.seed = out.seed
    return result


class _ReportingVAE:
    """Reports the decode stage, and checks for cancellation before the (long) decode starts."""

    def __init__(self, inner, controls: Controls):
        self.inner, self.controls = inner, controls

    def encode(self, image):
        return self.inner.encode(image)

    def decode(self, latent) -> np.ndarray:
        self.controls.check()
        self.controls.report(Progress("decode", 0, 1))
        return self.inner.decode(latent)


class Watcher:
    """While a job runs: renews its lease, turns a cancellation request into controls.cancel, and writes
    progress to the job record (throttled)."""

    def __init__(self, jobs: JobStore, job_id: str, worker: str, lease_s: float, deadline_at: float = 0.0):
        self.jobs, self.job_id, self.worker, self.lease_s = jobs, job_id, worker, lease_s
        self.deadline_at = deadline_at
        self.late = threading.Event()  # the job's deadline passed: stopped, to end DEADLINE_EXCEEDED
        self.controls = Controls(on_progress=self._progress)
        self._stop = threading.Event()
        self.lost = threading.Event()  # the lease lapsed and the job may be someone else's now
        self._thread = threading.Thread(target=self._loop, name=f"watch-{job_id[:8]}", daemon=True)
        self._last: tuple[str, float] = ("", 0.0)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        renew_every, last_renew = self.lease_s / 3, time.monotonic()
        while not self._stop.wait(min(0.5, renew_every)):
            try:
                if self.deadline_at and time.time() >= self.deadline_at and not self.controls.cancel.is_set():
                    self.late.set()
                    self.controls.cancel.set()
                if self.jobs.cancel_requested(self.job_id):
                    self.controls.cancel.set()
                if time.monotonic() - last_renew >= renew_every:
                    if not self.jobs.renew_lease(self.job_id, self.worker, self.lease_s):
                        # Stop working on it: the janitor may already have queued it again.
                        log.warning("job lease lost", extra={"job_id": self.job_id})
                        self.lost.set()
                        self.controls.cancel.set()
                        return
                    last_renew = time.monotonic()
            except Exception:  # noqa: BLE001 - Redis blips must not kill the job; the next round retries
                log.warning("job watcher round failed", exc_info=True, extra={"job_id": self.job_id})

    def _progress(self, p: Progress) -> None:
        if self.lost.is_set():
            return  # the job may run elsewhere now: its record is not ours to write
        now = time.monotonic()
        stage, at = self._last
        if p.stage == stage and now - at < PROGRESS_INTERVAL_S and p.step < p.total:
            return
        self._last = (p.stage, now)
        try:
            self.jobs.progress(self.job_id, p.stage, p.step, p.total, p.text)
        except Exception:  # noqa: BLE001 - progress is best effort
            log.warning("progress not recorded", exc_info=True, extra={"job_id": self.job_id})
