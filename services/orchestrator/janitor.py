"""Housekeeping that no single job does for itself, run by every worker process (one at a time, under a
Redis lock) every `BAGEL_JOB_SWEEP_SECONDS`:

- A job whose worker died mid-run (killed, node lost) keeps its task message unacknowledged; the broker
  would only hand it out again after the visibility timeout (an hour by default). The janitor finds
  such jobs sooner: started, not ended, and their lease lapsed (a live worker renews it every lease/3
  seconds). It puts each back to QUEUED and queues a new message, so the job is taken over about
  `lease + sweep` seconds after its worker died. The old message stays a backstop: if it is delivered
  later, the job has ended or is leased, and that delivery does nothing.
- A job accepted but never started within `BAGEL_JOB_REQUEUE_SECONDS` of its message being sent, and
  whose message is in the broker neither waiting nor delivered, gets a new message: the old one was lost
  (its worker died while Redis refused writes, or Redis came back without its last writes). Sent
  messages are tracked in `bagel:queued`, so each job is sent again at most once per bound; a duplicate
  is harmless anyway (the runner's lease: a second delivery waits or returns). A job waiting for a
  retry is started and held by its worker's lease, and is not sent again.
- Every job not ended `BAGEL_JOB_MAX_AGE_SECONDS` after it was accepted ends FAILED /
  DEADLINE_EXCEEDED: nothing accepted stays unended (and its record unexpired) forever.
- A queued job past its deadline (`deadline_seconds`) ends FAILED / DEADLINE_EXCEEDED, rather than
  when a worker reaches it in the queue. (A running one is stopped by its own worker.)
- The objects of a job (input, features, latents, output) are deleted once its record has expired:
  nothing can ask for them after that. (The runner already deletes all but the output when a job ends.)
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from services.common.storage import ObjectStore, job_prefix
from services.orchestrator.jobs import JobStore
from services.orchestrator.settings import QUEUE

REQUEUE_S = 600.0               # defaults of BAGEL_JOB_REQUEUE_SECONDS and BAGEL_JOB_MAX_AGE_SECONDS
MAX_AGE_S = 7 * 86400 + 3600.0  # the longest deadline (7 days) and an hour

log = logging.getLogger("bagel.janitor")

LOCK_NAME = "janitor"


@dataclass
class Sweep:
    rescued: list[str] = field(default_factory=list)  # jobs queued again (their worker died)
    resent: list[str] = field(default_factory=list)   # never-started jobs sent again (message lost)
    too_old: list[str] = field(default_factory=list)  # unended jobs ended at the maximum age
    late: list[str] = field(default_factory=list)     # queued jobs ended past their deadline
    purged: list[str] = field(default_factory=list)   # expired jobs whose objects were deleted
    objects: int = 0                                  # objects deleted
    skipped: bool = False                             # another worker holds the sweep lock


class Janitor:
    def __init__(self, jobs: JobStore, store: ObjectStore, requeue: Callable[[str], None],
                 on_sweep: Callable[[Sweep], None] | None = None, requeue_after_s: float = REQUEUE_S,
                 max_age_s: float = MAX_AGE_S, queue: str = QUEUE):
        self.jobs, self.store, self.requeue, self.on_sweep = jobs, store, requeue, on_sweep
        self.requeue_after_s, self.max_age_s, self.queue = requeue_after_s, max_age_s, queue
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self, now: float | None = None, lock_s: float = 60.0) -> Sweep:
        """One round: rescue orphaned jobs, send lost messages again, end jobs too old or past their
        deadline, delete the objects of expired ones."""
        token = self.jobs.try_lock(LOCK_NAME, lock_s)
        if token is None:
            return Sweep(skipped=True)
        try:
            out = Sweep()
            for job_id in self.jobs.started_ids():
                if self.jobs.rescue(job_id):
                    # Marked QUEUED before the message is sent: were this process to die in between, the
                    # job's original (unacknowledged) message still comes back after the visibility timeout.
                    self.requeue(job_id)
                    out.rescued.append(job_id)
                    log.warning("job queued again: its worker stopped renewing the lease", extra={"job_id": job_id})
            now = time.time() if now is None else now
            out.too_old = self.jobs.end_too_old(now, self.max_age_s)
            for job_id in out.too_old:
                log.warning("job ended: older than the maximum age", extra={"job_id": job_id})
            out.late = self.jobs.end_late_queued(now)
            due = self.jobs.due_to_resend(now, self.requeue_after_s)  # marked sent first, as above
            pending = self.jobs.messages_pending(due, self.queue)
            for job_id in due:
                if job_id not in pending:
                    self.requeue(job_id)
                    out.resent.append(job_id)
                    log.warning("job queued again: not started and its message is gone", extra={"job_id": job_id})
            expired = self.jobs.ended_before(now - self.jobs.ttl)
            for job_id in expired:
                out.objects += self.store.delete_prefix(job_prefix(job_id))
                out.purged.append(job_id)
            self.jobs.forget_ended(out.purged)
            if self.on_sweep is not None:
                self.on_sweep(out)
            return out
        finally:
            self.jobs.unlock(LOCK_NAME, token)

    def start(self, interval_s: float) -> None:
        """Sweep every `interval_s` seconds in a daemon thread until stop()."""
        def loop():
            while not self._stop.wait(interval_s):
                try:
                    self.sweep()
                except Exception:  # noqa: BLE001 - Redis or storage away: the next round tries again
                    log.warning("janitor sweep failed", exc_info=True)

        self._thread = threading.Thread(target=loop, name="bagel-janitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
