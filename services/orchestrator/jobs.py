"""Job records in Redis: the one place a job's state, progress and result live.

The gateway creates a record before it queues the job and reads it to answer clients; Celery workers
move it through its states. Every change is published on the job's channel, so Watch / Run and HTTP
long-polls follow a job without polling Redis.

Keys (prefix `bagel:`):
    job:{id}          hash: `job` (the Job proto), `request` (the SubmitJobRequest proto, image
                      bytes moved to the bucket), `cancel` ("1" once cancellation was asked for)
    job:{id}:lease    the worker running it; expires unless renewed, so a dead worker's job is
                      taken over by the next delivery of its message
    job:{id}:events   pub/sub channel: the Job after every change
    idem:{key}        idempotency key -> job id
    running           set: ids of jobs a worker has started and not ended (the janitor looks here for
                      jobs whose worker died)
    ended             sorted set: id -> end time (the janitor deletes their objects once the record
                      has expired)
    deadlines         sorted set: id -> deadline of jobs not ended that have one (the janitor ends
                      queued ones past it)
    queued            sorted set: id -> when its task message was last sent, for jobs not yet started
                      (the janitor sends again those waiting too long: their message may be lost)
    open              sorted set: id -> creation time of every job not ended (the janitor ends those
                      older than the maximum age, so no record lives forever)

Records of finished jobs expire after `ttl_seconds` (default one day); unended ones are ended by the
janitor at the latest at its maximum age.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterator

import redis
from redis.exceptions import LockNotOwnedError
from redis.lock import Lock

from services.common.contracts import JobNotFound
from services.common.protos import jobs_pb2

PREFIX = "bagel:"
RUNNING_SET, ENDED_ZSET, DEADLINE_ZSET = f"{PREFIX}running", f"{PREFIX}ended", f"{PREFIX}deadlines"
QUEUED_ZSET, OPEN_ZSET = f"{PREFIX}queued", f"{PREFIX}open"
HEALTH_KEY = f"{PREFIX}health"
# Where kombu's Redis transport keeps messages delivered to a worker and not yet acknowledged.
UNACKED_HASH = "unacked"
TERMINAL = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})
STATE_NAMES = {v: k.removeprefix("JOB_STATE_").lower() for k, v in jobs_pb2.JobState.items()}
_ID_CHARS = frozenset("0123456789abcdef-")



@dataclass
class Created:
    job: jobs_pb2.Job
    new: bool  # False: an earlier job with the same idempotency key


def is_terminal(job: jobs_pb2.Job) -> bool:
    return job.state in TERMINAL


def valid_id(job_id: str) -> bool:
    return 0 < len(job_id) <= 64 and set(job_id) <= _ID_CHARS


def connections_for(streams: int) -> int:
    """Redis connections for `streams` concurrent watches: a pub/sub connection and a read each, plus headroom
    for the rest of the process (the HTTP front's thread pool, readiness and metrics reads)."""
    return 2 * streams + 64


class JobStore:
    def __init__(self, client: redis.Redis, ttl_seconds: int = 86400):
        self.r, self.ttl = client, ttl_seconds

    @classmethod
    def from_url(cls, url: str, max_connections: int = 100, **kwargs) -> "JobStore":
        return cls(redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30,
                                        max_connections=max_connections), **kwargs)

    def fit_streams(self, streams: int) -> None:
        """Grow the connection pool for `streams` jobs followed at once (watch holds a pub/sub connection for
        its whole length and borrows another for each read). Past the pool's size redis-py fails at once
        ("Too many connections"): its default of 100 capped a gateway at ~99 concurrent Watches."""
        pool = self.r.connection_pool
        pool.max_connections = max(pool.max_connections, connections_for(streams))

    # ---- keys ----
    @staticmethod
    def key(job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    def channel(self, job_id: str) -> str:
        return self.key(job_id) + ":events"

    # ---- create / read ----
    def create(self, request: jobs_pb2.SubmitJobRequest, job_id: str | None = None) -> Created:
        """Record a QUEUED job (the caller then queues its task). With an idempotency key already seen,
        returns that job instead."""
        job_id = job_id or uuid.uuid4().hex
        if request.idempotency_key:
            idem = f"{PREFIX}idem:{request.idempotency_key}"
            if not self.r.set(idem, job_id, nx=True, ex=self.ttl):
                earlier = self.r.get(idem)
                if earlier is not None:
                    try:
                        return Created(self.get(earlier.decode()), new=False)
                    except JobNotFound:
                        pass  # the key outlived its job: take it over
                self.r.set(idem, job_id, ex=self.ttl)
        job = jobs_pb2.Job(id=job_id, workflow=request.workflow, state=jobs_pb2.JOB_STATE_QUEUED,
                           progress=jobs_pb2.JobProgress(stage="queued"), created_at=time.time())
        if request.deadline_seconds:
            job.deadline_at = job.created_at + request.deadline_seconds
        pipe = self.r.pipeline()  # one MULTI: a record is never without its index entries
        pipe.hset(self.key(job_id), mapping={"job": job.SerializeToString(), "request": request.SerializeToString()})
        pipe.zadd(QUEUED_ZSET, {job_id: job.created_at})  # the caller sends its message next
        pipe.zadd(OPEN_ZSET, {job_id: job.created_at})
        if job.deadline_at:
            pipe.zadd(DEADLINE_ZSET, {job_id: job.deadline_at})
        pipe.execute()
        self._publish(job)
        return Created(job, new=True)

    def get(self, job_id: str) -> jobs_pb2.Job:
        raw = self.r.hget(self.key(job_id), "job") if valid_id(job_id) else None
        if raw is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, or finished more than {self.ttl} s ago)")
        return jobs_pb2.Job.FromString(raw)

    def request(self, job_id: str) -> jobs_pb2.SubmitJobRequest:
        raw = self.r.hget(self.key(job_id), "request")
        if raw is None:
            raise JobNotFound(f"no job {job_id!r}")
        return jobs_pb2.SubmitJobRequest.FromString(raw)

    # ---- changes ----
    def update(self, job_id: str, change: Callable[[jobs_pb2.Job], bool]) -> jobs_pb2.Job:
        """Read-modify-write under WATCH: `change` edits the job in place and says whether it did (True) or
        left it as it was (False). Publishes the result when it changed."""
        key = self.key(job_id)
        changed: dict[str, bool] = {}

        def transaction(pipe: redis.client.Pipeline) -> jobs_pb2.Job:
            raw = pipe.hget(key, "job")
            if raw is None:
                raise JobNotFound(f"no job {job_id!r}")
            job = jobs_pb2.Job.FromString(raw)
            changed["yes"] = change(job)
            pipe.multi()
            if changed["yes"]:
                pipe.hset(key, "job", job.SerializeToString())
                if job.state == jobs_pb2.JOB_STATE_RUNNING:
                    pipe.sadd(RUNNING_SET, job_id)
                    pipe.zrem(QUEUED_ZSET, job_id)  # started: its message arrived
                if is_terminal(job):
                    pipe.expire(key, self.ttl)
                    pipe.srem(RUNNING_SET, job_id)
                    pipe.zrem(DEADLINE_ZSET, job_id)
                    pipe.zrem(QUEUED_ZSET, job_id)
                    pipe.zrem(OPEN_ZSET, job_id)
                    pipe.zadd(ENDED_ZSET, {job_id: job.finished_at})
            return job

        job = self.r.transaction(transaction, key, value_from_callable=True)
        if changed.get("yes"):
            self._publish(job)
        return job

    def start(self, job_id: str) -> jobs_pb2.Job | None:
        """QUEUED (or RUNNING, when a worker died with it) -> RUNNING. None: nothing left to do (it has
        ended, or was cancelled while queued, which ends it here)."""
        cancel = self.cancel_requested(job_id)

        def change(job: jobs_pb2.Job):
            if is_terminal(job):
                return False
            if cancel:
                return _end(job, jobs_pb2.JOB_STATE_CANCELLED, error=("CANCELLED", "cancelled before it started"))
            if past_deadline(job):
                return _end(job, jobs_pb2.JOB_STATE_FAILED, error=("DEADLINE_EXCEEDED", late_message(job)))
            job.state, job.attempts = jobs_pb2.JOB_STATE_RUNNING, job.attempts + 1
            job.started_at = job.started_at or time.time()
            job.progress.CopyFrom(jobs_pb2.JobProgress(stage="encode"))
            return True

        job = self.update(job_id, change)
        return job if job.state == jobs_pb2.JOB_STATE_RUNNING else None

    def progress(self, job_id: str, stage: str, step: int = 0, total: int = 0, text: str = "") -> None:
        def change(job: jobs_pb2.Job):
            if job.state != jobs_pb2.JOB_STATE_RUNNING:
                return False
            job.progress.CopyFrom(jobs_pb2.JobProgress(stage=stage, step=step, total=total, text=text))
            return True

        self.update(job_id, change)

    def requeue(self, job_id: str, reason: str) -> jobs_pb2.Job:
        """Back to QUEUED after a transient failure; the task is retried."""
        def change(job: jobs_pb2.Job):
            if is_terminal(job):
                return False
            job.state = jobs_pb2.JOB_STATE_QUEUED
            job.progress.CopyFrom(jobs_pb2.JobProgress(stage="queued"))
            job.error.CopyFrom(jobs_pb2.JobError(code="UNAVAILABLE", message=f"retrying: {reason}"))
            return True

        return self.update(job_id, change)

    def succeed(self, job_id: str, result: jobs_pb2.JobResult) -> jobs_pb2.Job:
        return self.update(job_id, lambda job: _end(job, jobs_pb2.JOB_STATE_SUCCEEDED, result=result))

    def fail(self, job_id: str, code: str, message: str) -> jobs_pb2.Job:
        state = jobs_pb2.JOB_STATE_CANCELLED if code == "CANCELLED" else jobs_pb2.JOB_STATE_FAILED
        return self.update(job_id, lambda job: _end(job, state, error=(code, message)))

    def request_cancel(self, job_id: str) -> jobs_pb2.Job:
        """A queued job ends CANCELLED now; a running one is flagged and its worker stops at the next step."""
        job = self.get(job_id)
        if is_terminal(job):
            return job
        self.r.hset(self.key(job_id), "cancel", "1")

        def change(job: jobs_pb2.Job):
            if job.state != jobs_pb2.JOB_STATE_QUEUED:
                return False
            return _end(job, jobs_pb2.JOB_STATE_CANCELLED, error=("CANCELLED", "cancelled before it started"))

        job = self.update(job_id, change)
        if job.state == jobs_pb2.JOB_STATE_RUNNING:
            self.r.publish(self.channel(job_id), job.SerializeToString())  # wakes the worker's watcher
        return job

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.key(job_id), "cancel") == b"1"

    # ---- jobs whose worker died, and ended jobs whose objects can go (janitor.py) ----
    def started_ids(self) -> list[str]:
        """Jobs a worker has started and not ended (RUNNING, or QUEUED waiting for a retry)."""
        return sorted(m.decode() for m in self.r.smembers(RUNNING_SET))

    def rescue(self, job_id: str) -> bool:
        """A started job whose lease has lapsed (its worker died) goes back to QUEUED, to be queued again.
        False when there is nothing to rescue: it ended, a worker holds its lease, or it is not a started job
        (any more: rescued already)."""
        key, lease = self.key(job_id), self._lease_key(job_id)
        rescued: dict[str, jobs_pb2.Job] = {}

        def change(pipe: redis.client.Pipeline) -> None:
            rescued.clear()  # a transaction retried after a concurrent change starts over
            raw, held, started = pipe.hget(key, "job"), pipe.exists(lease), pipe.sismember(RUNNING_SET, job_id)
            job = None if raw is None else jobs_pb2.Job.FromString(raw)
            pipe.multi()
            if not started:
                pass  # not a started job: nothing of this sweep's to do
            elif job is None or is_terminal(job):
                pipe.srem(RUNNING_SET, job_id)  # ended (or expired) without leaving the set
            elif not held:
                job.state = jobs_pb2.JOB_STATE_QUEUED
                job.progress.CopyFrom(jobs_pb2.JobProgress(stage="queued"))
                job.error.CopyFrom(jobs_pb2.JobError(code="UNAVAILABLE",
                                                     message="its worker stopped renewing its lease; queued again"))
                pipe.hset(key, "job", job.SerializeToString())
                pipe.srem(RUNNING_SET, job_id)
                pipe.zadd(QUEUED_ZSET, {job_id: time.time()})  # the janitor sends its message next
                rescued["job"] = job

        self.r.transaction(change, key, lease)  # a job joins or leaves the started set with a change of its key
        if "job" in rescued:
            self._publish(rescued["job"])
        return "job" in rescued

    def end_late_queued(self, now: float | None = None, limit: int = 500) -> list[str]:
        """Queued jobs past their deadline end FAILED / DEADLINE_EXCEEDED (running ones are stopped by
        their worker). Returns the ids ended."""
        now = time.time() if now is None else now
        due = [m.decode() for m in self.r.zrangebyscore(DEADLINE_ZSET, "-inf", now, start=0, num=limit)]
        ended: list[str] = []
        for job_id in due:
            this: dict[str, bool] = {}

            def change(job: jobs_pb2.Job):
                this.clear()  # a transaction retried after a concurrent change starts over
                if job.state != jobs_pb2.JOB_STATE_QUEUED or not past_deadline(job, now):
                    return False  # running: its worker stops it; ended: update() already dropped it
                this["ended"] = True
                return _end(job, jobs_pb2.JOB_STATE_FAILED, error=("DEADLINE_EXCEEDED", late_message(job)))

            try:
                self.update(job_id, change)
            except JobNotFound:
                self.r.zrem(DEADLINE_ZSET, job_id)  # expired record
            if this:
                ended.append(job_id)
        return ended

    def due_to_resend(self, now: float, after_s: float, limit: int = 500) -> list[str]:
        """Queued jobs whose message was last sent `after_s` or more before `now` and that nobody has
        started: their message may be lost (a worker died while Redis was full, Redis came back without
        its last writes). Each one's time is bumped to `now`, so it is due again only a full `after_s`
        later; the caller sends a new message (a duplicate is harmless: see runner.execute). Jobs that
        started, ended or expired leave the index; one whose lease is held (a worker about to start it)
        is passed over."""
        due = [m.decode() for m in self.r.zrangebyscore(QUEUED_ZSET, "-inf", now - after_s, start=0, num=limit)]
        out: list[str] = []
        for job_id in due:
            key, lease = self.key(job_id), self._lease_key(job_id)

            def change(pipe: redis.client.Pipeline) -> bool:
                raw, held, started = pipe.hget(key, "job"), pipe.exists(lease), pipe.sismember(RUNNING_SET, job_id)
                job = None if raw is None else jobs_pb2.Job.FromString(raw)
                pipe.multi()
                if job is None or job.state != jobs_pb2.JOB_STATE_QUEUED or started:
                    # Expired, ended, or started (one waiting for a retry is its worker's, or the rescue's).
                    pipe.zrem(QUEUED_ZSET, job_id)
                    return False
                if held:
                    return False
                pipe.zadd(QUEUED_ZSET, {job_id: now})
                return True

            # A job joins the started set only with a change of its key, so watching the key covers both.
            if self.r.transaction(change, key, lease, value_from_callable=True):
                out.append(job_id)
        return out

    def messages_pending(self, job_ids: list[str], queue: str) -> set[str]:
        """Those of `job_ids` whose task message is still in the broker (waiting in `queue`, or delivered
        and unacknowledged): sending another would only duplicate it. Reads the broker's Redis keys
        (kombu's layout) when the broker shares this Redis; the job id is in each message's `argsrepr`
        header. A message not found here is treated as lost, the safe side."""
        if not job_ids:
            return set()
        blob = b"\n".join(self.r.lrange(queue, 0, -1)) + b"\n".join(self.r.hvals(UNACKED_HASH))
        return {job_id for job_id in job_ids if job_id.encode() in blob}

    def end_too_old(self, now: float, max_age_s: float, limit: int = 500) -> list[str]:
        """Jobs accepted `max_age_s` or more before `now` and not ended end FAILED / DEADLINE_EXCEEDED,
        whatever their state: the upper bound on a record's life, so nothing accepted waits forever."""
        due = [m.decode() for m in self.r.zrangebyscore(OPEN_ZSET, "-inf", now - max_age_s, start=0, num=limit)]
        message = f"not finished within the maximum age of a job ({max_age_s:.0f} s after it was accepted)"
        ended: list[str] = []
        for job_id in due:
            this: dict[str, bool] = {}

            def change(job: jobs_pb2.Job):
                this.clear()  # a transaction retried after a concurrent change starts over
                this["ended"] = _end(job, jobs_pb2.JOB_STATE_FAILED, error=("DEADLINE_EXCEEDED", message))
                return this["ended"]

            try:
                self.update(job_id, change)
            except JobNotFound:
                pass
            if this.get("ended"):
                ended.append(job_id)
            else:
                self.r.zrem(OPEN_ZSET, job_id)  # expired, or ended without leaving the index
        return ended

    def writable(self) -> None:
        """Raises (redis.RedisError) unless Redis accepts a write: a Redis at maxmemory with noeviction
        still answers PING but refuses every new job."""
        self.r.set(HEALTH_KEY, b"1", ex=60)

    def ended_before(self, cutoff: float, limit: int = 500) -> list[str]:
        return [m.decode() for m in self.r.zrangebyscore(ENDED_ZSET, "-inf", cutoff, start=0, num=limit)]

    def forget_ended(self, job_ids: list[str]) -> None:
        if job_ids:
            self.r.zrem(ENDED_ZSET, *job_ids)

    # ---- locks and leases: redis-py's Lock (SET NX PX with a token; only the holder extends or frees) ----
    def _lock(self, key: str, ttl_s: float) -> Lock:
        return self.r.lock(key, timeout=ttl_s, thread_local=False)

    def _held(self, key: str, token: str, ttl_s: float) -> Lock:
        """The lock object of a holder known by its token (held by this or another process's call)."""
        lock = self._lock(key, ttl_s)
        lock.local.token = token.encode()
        return lock

    def try_lock(self, name: str, ttl_s: float) -> str | None:
        """A named lock (the janitor's: one sweep at a time across workers); its token, or None when held."""
        token = uuid.uuid4().hex
        return token if self._lock(f"{PREFIX}{name}", ttl_s).acquire(blocking=False, token=token) else None

    def unlock(self, name: str, token: str) -> None:
        self._release(f"{PREFIX}{name}", token)

    # one worker at a time per job
    def acquire_lease(self, job_id: str, worker: str, ttl_s: float) -> bool:
        return self._lock(self._lease_key(job_id), ttl_s).acquire(blocking=False, token=worker)

    def renew_lease(self, job_id: str, worker: str, ttl_s: float) -> bool:
        """False when the lease is no longer this worker's (it lapsed, and maybe another took it)."""
        try:
            return self._held(self._lease_key(job_id), worker, ttl_s).reacquire()
        except LockNotOwnedError:
            return False

    def release_lease(self, job_id: str, worker: str) -> None:
        self._release(self._lease_key(job_id), worker)

    def _lease_key(self, job_id: str) -> str:
        return self.key(job_id) + ":lease"

    def _release(self, key: str, token: str) -> None:
        try:
            self._held(key, token, 1).release()
        except LockNotOwnedError:
            pass  # lapsed (and perhaps taken by another holder): nothing of ours to free

    # ---- following a job ----
    def subscribe(self, job_id: str) -> redis.client.PubSub:
        """The job's change events, from now on (also for a job about to be created)."""
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel(job_id))
        return pubsub

    def watch(self, job_id: str, timeout: float | None = None, poll_s: float = 1.0,
              alive: Callable[[], bool] | None = None, since: tuple[redis.client.PubSub, jobs_pb2.Job] | None = None
              ) -> Iterator[jobs_pb2.Job]:
        """The job now, then after every change, until it ends, `timeout` seconds pass, or `alive()` turns
        False (the watcher went away). Subscribes before reading, so no change between the read and the
        subscription is missed; re-reads every poll_s in case a message was dropped (pub/sub does not
        queue for a reconnecting subscriber). `since`: a subscription made before the job was created,
        and the job as created, which is then the first update, followed by every change in order."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pubsub = since[0] if since else self.subscribe(job_id)
        try:
            last = since[1] if since else self.get(job_id)
            yield last
            while not is_terminal(last):
                wait = poll_s if deadline is None else min(poll_s, deadline - time.monotonic())
                if wait <= 0 or (alive is not None and not alive()):
                    return
                msg = _next_message(pubsub, wait)
                job = jobs_pb2.Job.FromString(msg["data"]) if msg else self.get(job_id)
                if job != last:
                    last = job
                    yield job
        finally:
            pubsub.close()

    def _publish(self, job: jobs_pb2.Job) -> None:
        self.r.publish(self.channel(job.id), job.SerializeToString())


def past_deadline(job: jobs_pb2.Job, now: float | None = None) -> bool:
    return bool(job.deadline_at) and (time.time() if now is None else now) >= job.deadline_at


def late_message(job: jobs_pb2.Job) -> str:
    return f"not finished within its deadline ({job.deadline_at - job.created_at:.0f} s after it was accepted)"


def _next_message(pubsub: redis.client.PubSub, timeout: float) -> dict | None:
    """The next published message, or None after `timeout` seconds without one. (get_message alone also
    returns None for the subscription's confirmation, which would look like a quiet channel.)"""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        msg = pubsub.get_message(timeout=left)
        if msg is not None:
            return msg
    return None


def _end(job: jobs_pb2.Job, state: int, result: jobs_pb2.JobResult | None = None,
         error: tuple[str, str] | None = None):
    if is_terminal(job):
        return False  # the first ending stands
    job.state, job.finished_at = state, time.time()
    job.progress.CopyFrom(jobs_pb2.JobProgress(stage=STATE_NAMES[state]))
    job.ClearField("error")
    if result is not None:
        job.result.CopyFrom(result)
    if error is not None:
        job.error.CopyFrom(jobs_pb2.JobError(code=error[0], message=error[1]))
    return True


class AsyncJobReader:
    """The gateway's asyncio view of the job records: read and follow jobs without a thread per waiting
    client. All followers share one pub/sub connection (_Hub) and a small bounded pool for reads, so
    hundreds of long polls and event streams cost coroutines, not threads or connections. Writes stay
    with JobStore; this only reads and listens."""

    def __init__(self, url: str, ttl_seconds: int = 86400, max_connections: int = 32):
        import redis.asyncio as aioredis  # the asyncio client; only the gateway needs it

        # A blocking pool: a burst of readers waits for a connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10,
                                                        socket_timeout=10, socket_connect_timeout=5,
                                                        health_check_interval=30)
        self.r = aioredis.Redis(connection_pool=pool)
        self.ttl = ttl_seconds
        self._hub = _Hub(self.r)

    async def get(self, job_id: str) -> jobs_pb2.Job:
        raw = await self.r.hget(JobStore.key(job_id), "job") if valid_id(job_id) else None
        if raw is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, or finished more than {self.ttl} s ago)")
        return jobs_pb2.Job.FromString(raw)

    async def watch(self, job_id: str, timeout: float | None = None, tick_s: float = 1.0, reread_s: float = 5.0,
                    idle: bool = False) -> AsyncIterator[jobs_pb2.Job | None]:
        """The job now, then after every change, until it ends or `timeout` seconds pass (as
        JobStore.watch). Listens before reading, so no change in between is missed, and reads the record
        again every `reread_s` in case a message was lost (pub/sub does not queue across a reconnect).
        With `idle`, also None at every quiet `tick_s`, so the caller can send a keep-alive or check that
        its client is still there."""
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = JobStore.key(job_id) + ":events"
        inbox = await self._hub.join(channel)
        try:
            last = await self.get(job_id)
            yield last
            read_at = time.monotonic()
            while not is_terminal(last):
                wait = tick_s if deadline is None else min(tick_s, deadline - time.monotonic())
                if wait <= 0:
                    return
                try:
                    job = jobs_pb2.Job.FromString(await asyncio.wait_for(inbox.get(), wait))
                except asyncio.TimeoutError:
                    job = None
                if job is None and time.monotonic() - read_at >= reread_s:
                    job, read_at = await self.get(job_id), time.monotonic()
                if job is not None and job != last:
                    last = job
                    yield job
                elif idle:
                    yield None
        finally:
            await self._hub.leave(channel, inbox)

    async def wait(self, job_id: str, timeout: float, still_wanted: Callable[[], Awaitable[bool]] | None = None
                   ) -> jobs_pb2.Job:
        """The job once it has ended, or as it is when `timeout` passes (or the caller stops wanting it:
        `still_wanted()` is asked about once a second)."""
        last = None
        async for job in self.watch(job_id, timeout, idle=still_wanted is not None):
            if job is not None:
                last = job
            if still_wanted is not None and not await still_wanted():
                break
        return last

    async def ping(self) -> None:
        await self.r.ping()

    async def close(self) -> None:
        await self._hub.close()
        await self.r.aclose()


class _Hub:
    """One pub/sub connection for every follower in the process: channels are subscribed while someone
    listens, and each message is handed to the listeners' queues."""

    def __init__(self, r):
        self.r = r
        self.pubsub = None
        self.inboxes: dict[str, set[asyncio.Queue]] = {}
        self.task: asyncio.Task | None = None
        self.lock = asyncio.Lock()

    async def join(self, channel: str) -> asyncio.Queue:
        inbox: asyncio.Queue = asyncio.Queue(maxsize=64)  # a slow listener drops updates; it re-reads
        async with self.lock:
            if self.pubsub is None:
                self.pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            if channel not in self.inboxes:
                self.inboxes[channel] = set()
                await self.pubsub.subscribe(channel)
            self.inboxes[channel].add(inbox)
            if self.task is None or self.task.done():
                self.task = asyncio.get_running_loop().create_task(self._deliver())
        return inbox

    async def leave(self, channel: str, inbox: asyncio.Queue) -> None:
        async with self.lock:
            listeners = self.inboxes.get(channel)
            if listeners is None:
                return
            listeners.discard(inbox)
            if not listeners:
                del self.inboxes[channel]
                try:
                    await self.pubsub.unsubscribe(channel)
                except Exception:  # noqa: BLE001 - gone with the connection; resubscribed on reconnect otherwise
                    pass

    async def _deliver(self) -> None:
        while True:
            try:
                msg = await self.pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a dropped connection: listeners re-read; retry shortly
                await asyncio.sleep(0.5)
                continue
            if msg is None or msg.get("type") != "message":
                continue
            channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
            for inbox in list(self.inboxes.get(channel, ())):
                try:
                    inbox.put_nowait(msg["data"])
                except asyncio.QueueFull:
                    pass

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.pubsub is not None:
            await self.pubsub.aclose()
