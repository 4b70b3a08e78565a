"""How many jobs the gateway follows at once: the gRPC front serves its documented number of concurrent
streams, and no one client holds more than its share. A real gateway (no worker, no model servers) on a
Redis database of its own; jobs are recorded but never queued, so they stay QUEUED while followed."""

from __future__ import annotations

import time

import grpc
import pytest

from services.common.protos import jobs_pb2
from services.orchestrator.settings import OrchestratorSettings
from orchestra import Orchestrator
from service_helpers import expect_status


@pytest.fixture(scope="module")
def gateway(redis_server, store):
    # The model server addresses are never dialled: nothing here runs a job.
    o = Orchestrator(OrchestratorSettings(redis_url=redis_server.url[:-1] + "13"), store, worker=False)
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
