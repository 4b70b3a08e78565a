"""The workers' janitor against a real redis-server and the local S3 server: jobs whose worker died are
queued again, the objects of expired jobs are deleted, one sweep runs at a time."""

from __future__ import annotations

import time

import pytest

from services.common.protos import jobs_pb2
from services.common.storage import job_prefix
from services.orchestrator.janitor import Janitor
from services.orchestrator.jobs import JobStore
from services.orchestrator.settings import QUEUE, TASK

QUEUED, RUNNING = jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING


@pytest.fixture()
def jobs(redis_server):
    store = JobStore.from_url(redis_server.url[:-1] + "6", ttl_seconds=600)
    store.r.flushdb()
    yield store
    store.r.flushdb()


@pytest.fixture()
def janitor(jobs, store):
    requeued: list[str] = []
    j = Janitor(jobs, store, requeued.append)
    j.requeued = requeued
    return j


def started_job(jobs: JobStore, worker: str = "w1", lease_s: float = 30) -> str:
    job_id = jobs.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="x")).job.id
    assert jobs.acquire_lease(job_id, worker, lease_s)
    assert jobs.start(job_id).state == RUNNING
    return job_id


def test_a_job_whose_lease_lapsed_is_queued_again_once(jobs, janitor):
    alive, dead = started_job(jobs, "w1"), started_job(jobs, "w2", lease_s=0.2)
    queued = jobs.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="y")).job.id
    assert set(jobs.started_ids()) == {alive, dead}  # a job never started is the queue's business
    time.sleep(0.3)  # w2's lease lapses: it stopped renewing
    sweep = janitor.sweep()
    assert sweep.rescued == [dead] and janitor.requeued == [dead]
    job = jobs.get(dead)
    assert job.state == QUEUED and job.error.code == "UNAVAILABLE" and "lease" in job.error.message
    assert jobs.get(alive).state == RUNNING and jobs.get(queued).state == QUEUED
    assert jobs.started_ids() == [alive]
    assert janitor.sweep().rescued == [] and janitor.requeued == [dead]  # queued again once, not every sweep
    # The new message's worker takes it: running again, watched again.
    assert jobs.acquire_lease(dead, "w3", 30) and jobs.start(dead).attempts == 2
    assert set(jobs.started_ids()) == {alive, dead}


def test_ended_jobs_leave_the_started_set(jobs, janitor):
    job_id = started_job(jobs)
    jobs.succeed(job_id, jobs_pb2.JobResult(text="done"))
    assert jobs.started_ids() == []
    jobs.release_lease(job_id, "w1")
    assert janitor.sweep().rescued == []


def test_a_job_waiting_for_a_retry_is_not_taken_from_its_living_worker(jobs, janitor):
    job_id = started_job(jobs)
    jobs.requeue(job_id, "UNAVAILABLE: vae restarting")  # QUEUED, lease still held by w1
    assert janitor.sweep().rescued == [] and jobs.get(job_id).error.message.startswith("retrying")


def test_objects_of_expired_jobs_are_deleted(jobs, janitor, store):
    old, recent = started_job(jobs), started_job(jobs)
    for job_id in (old, recent):
        store.put_bytes(job_prefix(job_id) + "input", b"in")
        store.put_bytes(job_prefix(job_id) + "output.png", b"out")
        jobs.fail(job_id, "CANCELLED", "cancelled")
        time.sleep(0.05)
    expiry = {job_id: jobs.get(job_id).finished_at + jobs.ttl for job_id in (old, recent)}
    assert janitor.sweep(now=expiry[old] - 1).purged == []  # records still readable: objects kept
    sweep = janitor.sweep(now=expiry[old] + 0.01)  # past old's expiry, not recent's
    assert sweep.purged == [old] and sweep.objects == 2
    assert store.keys(job_prefix(old)) == [] and len(store.keys(job_prefix(recent))) == 2
    assert janitor.sweep(now=expiry[old] + 0.01).purged == []  # forgotten once purged
    assert janitor.sweep(now=expiry[recent] + 0.01).purged == [recent] and store.keys(job_prefix(recent)) == []


def test_one_sweep_at_a_time(jobs, janitor, store):
    token = jobs.try_lock("janitor", 30)
    assert janitor.sweep().skipped
    jobs.unlock("janitor", token)
    assert not janitor.sweep().skipped
    assert jobs.try_lock("janitor", 30) is not None  # the sweep let go of its lock


def test_a_queued_job_past_its_deadline_ends_there(jobs, janitor):
    late = jobs.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="x",
                                                 deadline_seconds=60)).job
    patient = jobs.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="y")).job
    running = jobs.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="z",
                                                    deadline_seconds=60)).job
    assert jobs.acquire_lease(running.id, "w1", 600) and jobs.start(running.id).state == RUNNING
    assert late.deadline_at == pytest.approx(late.created_at + 60) and patient.deadline_at == 0
    assert janitor.sweep(now=late.deadline_at - 1).late == []
    assert janitor.sweep(now=running.deadline_at + 1).late == [late.id]
    job = jobs.get(late.id)
    assert job.state == jobs_pb2.JOB_STATE_FAILED and job.error.code == "DEADLINE_EXCEEDED"
    assert "60 s" in job.error.message
    assert jobs.get(patient.id).state == QUEUED  # no deadline
    assert jobs.get(running.id).state == RUNNING  # its worker stops it, not the janitor
    jobs.succeed(running.id, jobs_pb2.JobResult(text="made it"))
    assert jobs.r.zcard("bagel:deadlines") == 0  # ended jobs leave the deadline index


def test_a_job_reached_after_its_deadline_never_starts(jobs):
    job = jobs.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="x",
                                                deadline_seconds=1)).job
    time.sleep(1.05)
    assert jobs.acquire_lease(job.id, "w1", 30) and jobs.start(job.id) is None
    ended = jobs.get(job.id)
    assert ended.state == jobs_pb2.JOB_STATE_FAILED and ended.error.code == "DEADLINE_EXCEEDED"
    assert ended.attempts == 0 and ended.started_at == 0


# ---- every accepted job ends: lost messages are sent again, and no record outlives the maximum age ----
@pytest.fixture()
def broker(jobs):
    """A Celery app on the janitor's Redis database: messages in the real broker layout."""
    from services.orchestrator.settings import OrchestratorSettings
    from services.orchestrator.tasks import make_celery

    url = jobs.r.connection_pool.connection_kwargs
    return make_celery(OrchestratorSettings(redis_url=f"redis://{url['host']}:{url['port']}/{url['db']}"))


def send(broker, job_id: str) -> None:
    broker.send_task(TASK, args=[job_id], queue=QUEUE)


def test_a_job_whose_message_was_lost_is_sent_again_once_per_bound(jobs, store, broker):
    sent: list[str] = []
    janitor = Janitor(jobs, store, lambda job_id: (sent.append(job_id), send(broker, job_id)), requeue_after_s=60)
    job = jobs.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="x")).job
    send(broker, job.id)  # accepted: recorded and queued
    assert janitor.sweep(now=job.created_at + 61).resent == []  # its message still waits in the queue
    jobs.r.delete(QUEUE)  # ...and is lost (a worker died while Redis was full, say)
    assert janitor.sweep(now=job.created_at + 100).resent == []  # bumped at the last sweep: not due yet
    assert janitor.sweep(now=job.created_at + 122).resent == [job.id] and sent == [job.id]
    assert jobs.r.llen(QUEUE) == 1 and job.id.encode() in jobs.r.lindex(QUEUE, 0)
    jobs.r.delete(QUEUE)
    assert janitor.sweep(now=job.created_at + 130).resent == []  # not twice within the bound
    assert janitor.sweep(now=job.created_at + 183).resent == [job.id]  # still lost: again a bound later
    # Delivered and not yet acknowledged (in the broker's unacked hash) also counts as on its way.
    jobs.r.hset("unacked", "tag-1", jobs.r.lpop(QUEUE))
    assert janitor.sweep(now=job.created_at + 300).resent == []
    assert jobs.get(job.id).state == QUEUED


def test_started_and_leased_jobs_are_not_sent_again(jobs, store):
    sent: list[str] = []
    janitor = Janitor(jobs, store, sent.append, requeue_after_s=60)
    running = started_job(jobs, "w1")
    retrying = started_job(jobs, "w2")
    jobs.requeue(retrying, "UNAVAILABLE: vae restarting")  # QUEUED, waiting for its retry, lease held by w2
    taken = jobs.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="y")).job.id
    assert jobs.acquire_lease(taken, "w3", 30)  # a worker about to start it
    ended = jobs.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="z")).job.id
    jobs.fail(ended, "CANCELLED", "cancelled")
    sweep = janitor.sweep(now=time.time() + 3600)
    assert sweep.resent == [] and sent == [] and sweep.rescued == []
    assert jobs.get(retrying).state == QUEUED and jobs.get(running).state == RUNNING
    assert jobs.r.zrange("bagel:queued", 0, -1) == [taken.encode()]  # started and ended ones left the index


def test_a_job_rescued_from_a_dead_worker_is_sent_again_if_that_message_is_lost(jobs, store):
    sent: list[str] = []
    janitor = Janitor(jobs, store, sent.append, requeue_after_s=60)
    dead = started_job(jobs, "w1", lease_s=0.2)
    time.sleep(0.3)
    now = time.time()
    assert janitor.sweep(now=now).rescued == [dead] and sent == [dead]
    assert janitor.sweep(now=now + 30).resent == []  # the rescue's message counts as sent
    assert janitor.sweep(now=now + 61).resent == [dead] and sent == [dead, dead]


def test_a_record_past_the_maximum_age_ends_failed(jobs, store):
    janitor = Janitor(jobs, store, lambda job_id: None, requeue_after_s=10 ** 9, max_age_s=3600)
    queued = jobs.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="x")).job
    running = started_job(jobs)
    done = started_job(jobs, "w2")
    jobs.succeed(done, jobs_pb2.JobResult(text="ok"))
    assert janitor.sweep(now=queued.created_at + 3599).too_old == []
    sweep = janitor.sweep(now=time.time() + 3600)
    assert sorted(sweep.too_old) == sorted([queued.id, running])
    for job_id in (queued.id, running):
        job = jobs.get(job_id)
        assert job.state == jobs_pb2.JOB_STATE_FAILED and job.error.code == "DEADLINE_EXCEEDED"
        assert "maximum age" in job.error.message
        assert 0 < jobs.r.ttl(jobs.key(job_id)) <= jobs.ttl  # the record expires like any ended one
    assert jobs.get(done).state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert jobs.r.zcard("bagel:open") == 0 and jobs.r.zcard("bagel:queued") == 0
    assert janitor.sweep(now=time.time() + 7200).too_old == []
