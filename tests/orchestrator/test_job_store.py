"""services/orchestrator/jobs.py's JobStore against a real redis-server (the `redis_server` fixture of
tests/live_servers.py, so these tests carry the `servers` marker): job states, idempotency, cancels,
the first ending standing, leases, locks, rescue and deadlines."""

from __future__ import annotations

import time
import uuid

import pytest

from services.common.contracts import JobNotFound
from services.common.protos import jobs_pb2
from services.orchestrator.jobs import JobStore

S = jobs_pb2
QUEUED, RUNNING = S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED = S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED


@pytest.fixture()
def jobs(redis_server):
    store = JobStore.from_url(redis_server.url[:-1] + "7", ttl_seconds=600)  # a database of its own
    store.r.flushdb()
    yield store
    store.r.flushdb()


def submit(jobs: JobStore, **fields) -> str:
    req = S.SubmitJobRequest(workflow=S.WORKFLOW_GENERATE, prompt="a lighthouse at dusk", **fields)
    return jobs.create(req).job.id


def test_create_records_a_queued_job_and_its_request(jobs):
    req = S.SubmitJobRequest(workflow=S.WORKFLOW_UNDERSTAND, prompt="what is this?", image_key="in/a.png",
                             think=True, text_params=S.SubmitJobRequest().text_params)
    created = jobs.create(req)
    assert created.new
    job = jobs.get(created.job.id)
    assert job == created.job
    assert (job.state, job.workflow, job.progress.stage, job.attempts) == (QUEUED, S.WORKFLOW_UNDERSTAND, "queued", 0)
    assert job.created_at == pytest.approx(time.time(), abs=30) and not job.deadline_at
    assert jobs.request(job.id) == req
    assert not jobs.cancel_requested(job.id) and jobs.started_ids() == []


def test_an_idempotency_key_returns_the_first_job(jobs):
    first = jobs.create(S.SubmitJobRequest(workflow=S.WORKFLOW_GENERATE, prompt="x", idempotency_key="k-1"))
    again = jobs.create(S.SubmitJobRequest(workflow=S.WORKFLOW_GENERATE, prompt="y", idempotency_key="k-1"))
    other = jobs.create(S.SubmitJobRequest(workflow=S.WORKFLOW_GENERATE, prompt="x", idempotency_key="k-2"))
    assert first.new and not again.new and other.new
    assert again.job.id == first.job.id and other.job.id != first.job.id
    assert jobs.request(first.job.id).prompt == "x"  # the first request is the one kept


def test_start_runs_the_job_once_per_attempt(jobs):
    job_id = submit(jobs)
    job = jobs.start(job_id)
    assert (job.state, job.attempts, job.progress.stage) == (RUNNING, 1, "encode") and job.started_at > 0
    assert jobs.get(job_id).state == RUNNING and jobs.started_ids() == [job_id]
    assert jobs.start(job_id).attempts == 2  # a worker that died with it: the next attempt


def test_cancel_of_a_queued_job_ends_it_and_it_never_starts(jobs):
    job_id = submit(jobs)
    job = jobs.request_cancel(job_id)
    assert job.state == CANCELLED and job.error.code == "CANCELLED" and job.finished_at > 0
    assert jobs.get(job_id).state == CANCELLED
    assert jobs.start(job_id) is None and jobs.get(job_id).state == CANCELLED


def test_cancel_of_a_running_job_flags_it_and_leaves_it_to_its_worker(jobs):
    job_id = submit(jobs)
    jobs.start(job_id)
    assert not jobs.cancel_requested(job_id)
    job = jobs.request_cancel(job_id)
    assert job.state == RUNNING and jobs.cancel_requested(job_id)
    assert jobs.get(job_id).state == RUNNING
    assert jobs.fail(job_id, "CANCELLED", "stopped at step 3").state == CANCELLED  # the worker's ending


def test_succeed_is_terminal_and_the_first_ending_stands(jobs):
    job_id = submit(jobs)
    jobs.start(job_id)
    result = S.JobResult(image_key="jobs/x/out.png", width=512, height=512, seed=5)
    job = jobs.succeed(job_id, result)
    assert job.state == SUCCEEDED and job.result == result and job.progress.stage == "succeeded"
    assert jobs.fail(job_id, "INTERNAL", "too late").state == SUCCEEDED
    assert jobs.request_cancel(job_id).state == SUCCEEDED and not jobs.cancel_requested(job_id)
    assert jobs.start(job_id) is None
    stored = jobs.get(job_id)
    assert stored.state == SUCCEEDED and stored.result == result and not stored.error.code
    assert jobs.started_ids() == []
    assert 0 < jobs.r.ttl(jobs.key(job_id)) <= 600  # ended records expire


def test_fail_is_terminal_too(jobs):
    job_id = submit(jobs)
    jobs.start(job_id)
    job = jobs.fail(job_id, "INVALID_ARGUMENT", "bad image")
    assert (job.state, job.error.code, job.error.message) == (FAILED, "INVALID_ARGUMENT", "bad image")
    assert jobs.succeed(job_id, S.JobResult(text="late")).state == FAILED
    assert jobs.get(job_id).result.text == ""


def test_progress_is_recorded_only_while_running(jobs):
    job_id = submit(jobs)
    jobs.progress(job_id, "denoise", 1, 50)
    assert jobs.get(job_id).progress.stage == "queued"
    jobs.start(job_id)
    jobs.progress(job_id, "denoise", 7, 50, text="")
    p = jobs.get(job_id).progress
    assert (p.stage, p.step, p.total) == ("denoise", 7, 50)
    jobs.succeed(job_id, S.JobResult())
    jobs.progress(job_id, "denoise", 8, 50)
    assert jobs.get(job_id).progress.stage == "succeeded"


def test_leases_belong_to_one_worker_until_they_lapse(jobs):
    job_id = submit(jobs)
    assert jobs.acquire_lease(job_id, "A", 0.5)
    assert not jobs.acquire_lease(job_id, "B", 30)
    assert jobs.renew_lease(job_id, "A", 0.5) is True
    assert jobs.renew_lease(job_id, "B", 30) is False
    jobs.release_lease(job_id, "B")  # not B's: A keeps it
    assert not jobs.acquire_lease(job_id, "B", 30)
    time.sleep(0.8)  # A stopped renewing
    assert jobs.acquire_lease(job_id, "B", 30)
    assert jobs.renew_lease(job_id, "A", 30) is False
    jobs.release_lease(job_id, "B")
    assert jobs.acquire_lease(job_id, "A", 30)  # freed by its holder


def test_named_locks(jobs):
    token = jobs.try_lock("janitor", 30)
    assert token
    assert jobs.try_lock("janitor", 30) is None
    assert jobs.try_lock("other", 30)  # locks are per name
    jobs.unlock("janitor", "not-the-token")
    assert jobs.try_lock("janitor", 30) is None
    jobs.unlock("janitor", token)
    assert jobs.try_lock("janitor", 30)


def test_rescue_queues_a_started_job_whose_lease_lapsed_once(jobs):
    job_id = submit(jobs)
    assert jobs.acquire_lease(job_id, "w1", 0.3)
    jobs.start(job_id)
    assert jobs.rescue(job_id) is False  # its worker still holds the lease
    assert jobs.get(job_id).state == RUNNING
    time.sleep(0.5)
    assert jobs.rescue(job_id) is True
    job = jobs.get(job_id)
    assert (job.state, job.progress.stage, job.error.code) == (QUEUED, "queued", "UNAVAILABLE")
    assert jobs.started_ids() == []  # out of the set the janitor sweeps: queued again once
    assert jobs.acquire_lease(job_id, "w2", 30) and jobs.start(job_id).attempts == 2
    assert jobs.rescue(job_id) is False  # w2 holds it now


def test_a_second_rescue_finds_nothing_to_rescue(jobs):
    job_id = submit(jobs)
    assert jobs.acquire_lease(job_id, "w1", 0.2)
    jobs.start(job_id)
    time.sleep(0.4)
    assert jobs.rescue(job_id) is True
    assert jobs.rescue(job_id) is False


def test_rescue_leaves_ended_jobs_alone(jobs):
    job_id = submit(jobs)
    jobs.start(job_id)
    jobs.succeed(job_id, S.JobResult(text="done"))
    assert jobs.rescue(job_id) is False and jobs.get(job_id).state == SUCCEEDED


def test_queued_jobs_past_their_deadline_end_there(jobs):
    late, running, fine, none = (submit(jobs, deadline_seconds=5), submit(jobs, deadline_seconds=5),
                                 submit(jobs, deadline_seconds=3600), submit(jobs))
    jobs.start(running)
    assert jobs.get(late).deadline_at == pytest.approx(jobs.get(late).created_at + 5)
    assert jobs.end_late_queued(now=time.time()) == []  # nothing due yet
    assert jobs.end_late_queued(now=time.time() + 60) == [late]
    job = jobs.get(late)
    assert (job.state, job.error.code) == (FAILED, "DEADLINE_EXCEEDED")
    assert jobs.get(running).state == RUNNING  # its worker stops it
    assert jobs.get(fine).state == QUEUED and jobs.get(none).state == QUEUED
    assert jobs.end_late_queued(now=time.time() + 60) == []  # ended once


def test_unknown_jobs_are_not_found(jobs):
    unknown = uuid.uuid4().hex
    for call in (lambda: jobs.get(unknown), lambda: jobs.request(unknown), lambda: jobs.start(unknown),
                 lambda: jobs.request_cancel(unknown), lambda: jobs.succeed(unknown, S.JobResult()),
                 lambda: jobs.fail(unknown, "INTERNAL", "x"), lambda: jobs.get("not a job id")):
        with pytest.raises(JobNotFound):
            call()
