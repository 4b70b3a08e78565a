"""How many jobs the gateway follows at once: the gRPC front serves its documented number of concurrent
streams, and no one client holds more than its share. A real gateway (no worker, no model servers) on a
Redis database of its own; jobs are recorded but never queued, so they stay QUEUED while followed."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

import grpc
import httpx
import pytest

from services.common.protos import jobs_pb2
from services.orchestrator.settings import OrchestratorSettings
from orchestra import Orchestrator
from service_helpers import expect_status


@pytest.fixture(scope="module")
def gateway(redis_server, store):
    # The model server addresses are never dialled: nothing here runs a job. One client (this process) opens
    # every stream, so its own limit is lifted above the server's.
    o = Orchestrator(OrchestratorSettings(redis_url=redis_server.url[:-1] + "13", max_streams_per_client=1000),
                     store, worker=False)
    yield o
    o.jobs.r.flushdb()
    o.close()


def queued_job(o: Orchestrator) -> str:
    request = jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="waits")
    return o.jobs.create(request).job.id  # recorded, not sent: it stays QUEUED


def test_the_grpc_front_serves_its_documented_number_of_watches(gateway):
    limit = gateway.proc.grpc.options.max_concurrency
    assert limit == 256  # as documented
    request = jobs_pb2.GetJobRequest(id=queued_job(gateway))
    start = time.monotonic()
    calls = [gateway.stub.Watch(request, timeout=30) for _ in range(limit)]
    try:
        # Each stream's first update is the job as it is: all of them admitted and following it.
        assert all(next(c).state == jobs_pb2.JOB_STATE_QUEUED for c in calls)
        # One more is refused at once, not left hanging or failed as INTERNAL.
        expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: next(gateway.stub.Watch(request, timeout=10)),
                      match="limit")
    finally:
        for c in calls:
            c.cancel()
    assert time.monotonic() - start < 30
    # The cancelled streams give their slots back (each notices within its 1 s poll).
    deadline = time.monotonic() + 10
    while True:
        try:
            assert next(gateway.stub.Watch(request, timeout=5)).state == jobs_pb2.JOB_STATE_QUEUED
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.2)


@pytest.fixture
def limited(redis_server, store):
    """A gateway allowing each client 3 open waiting requests."""
    o = Orchestrator(OrchestratorSettings(redis_url=redis_server.url[:-1] + "14", max_streams_per_client=3), store,
                     worker=False)
    yield o
    o.jobs.r.flushdb()
    o.close()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def open_events(client: httpx.Client, job_id: str, stack: ExitStack) -> httpx.Response:
    r = stack.enter_context(client.stream("GET", f"/v1/jobs/{job_id}/events"))
    if r.status_code == 200:
        lines = r.iter_lines()
        next(lines)  # the first event: the stream is open and counted
        stack.callback(lines.close)  # kept until then: a reader dropped early closes the stream
    return r


def test_a_client_holds_at_most_its_limit_of_event_streams(limited):
    job_id = queued_job(limited)
    streams = limited.gateway.streams
    with ExitStack() as held:
        first = ExitStack()
        held.callback(first.close)
        assert open_events(limited.http, job_id, first).status_code == 200
        assert all(open_events(limited.http, job_id, held).status_code == 200 for _ in range(2))
        assert streams.open("address:127.0.0.1") == 3
        with ExitStack() as extra:
            refused = open_events(limited.http, job_id, extra)
            assert refused.status_code == 429
            assert "3 open waiting requests" in json.loads(refused.read())["message"]
        # Long polls and gRPC streams of the same client count against the same limit.
        assert limited.http.get(f"/v1/jobs/{job_id}", params={"wait": 5}).status_code == 429
        assert limited.http.get(f"/v1/jobs/{job_id}").status_code == 200  # a plain read is no stream
        expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      lambda: next(limited.stub.Watch(jobs_pb2.GetJobRequest(id=job_id), timeout=5)),
                      match="3 open waiting requests")
        # Another address is another client.
        other = httpx.Client(base_url=str(limited.http.base_url), timeout=30,
                             transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        with other, ExitStack() as theirs:
            assert open_events(other, job_id, theirs).status_code == 200
        # A stream that ends gives its place back.
        first.close()
        wait_for(lambda: streams.open("address:127.0.0.1") == 2)
        with ExitStack() as again:
            assert open_events(limited.http, job_id, again).status_code == 200
    wait_for(lambda: streams.open("address:127.0.0.1") == 0 and streams.open("address:127.0.0.2") == 0)


def test_grpc_streams_are_counted_until_they_end(limited):
    request = jobs_pb2.GetJobRequest(id=queued_job(limited))
    streams = limited.gateway.streams
    calls = [limited.stub.Watch(request, timeout=30) for _ in range(3)]
    try:
        assert all(next(c).state == jobs_pb2.JOB_STATE_QUEUED for c in calls)
        expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: next(limited.stub.Watch(request, timeout=5)),
                      match="3 open waiting requests")
        assert limited.http.get(f"/v1/jobs/{request.id}/events").status_code == 429
        # A refused Run submits nothing.
        before = len(list(limited.jobs.r.scan_iter("bagel:job:*")))
        expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: next(limited.stub.Run(
            jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="x"), timeout=5)))
        assert len(list(limited.jobs.r.scan_iter("bagel:job:*"))) == before
        calls.pop().cancel()
        wait_for(lambda: streams.open("address:127.0.0.1") == 2)  # the handler notices within its 1 s poll
        assert next(limited.stub.Watch(request, timeout=5)).state == jobs_pb2.JOB_STATE_QUEUED
    finally:
        for c in calls:
            c.cancel()
    wait_for(lambda: streams.open("address:127.0.0.1") == 0)
