"""The orchestrator end to end with real components: a real redis-server (broker, backend, job records),
the local S3 server through `minio`, the three real gRPC model servers, a real Celery worker consuming
from Redis, and the gateway on real HTTP and gRPC ports. Results are compared with the same workflows
run in-process (tests/conftest.py's `clients`) on the same tiny checkpoint and seeds."""

from __future__ import annotations

import base64
import json
import threading
import time

import grpc
import numpy as np
import pytest

from services.common.protos import jobs_pb2, llm_pb2
from services.common.contracts import ImageParams, SessionRef, TextParams
from services.orchestrator import runner as runner_module, workflows as wf
from services.orchestrator.gateway import http_api
from services.orchestrator.jobs import JobStore
from services.orchestrator.runner import execute
from services.orchestrator.settings import QUEUE, OrchestratorSettings
from orchestra import Orchestrator, WorkerProcess, settings_for
from service_helpers import (decode_png, expect_status, llm_kv_blocks_left, metric_value, noise_image, png_bytes,
                             scrape)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING,
                                                 jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED,
                                                 jobs_pb2.JOB_STATE_CANCELLED)


@pytest.fixture(scope="module")
def orch(redis_server, vit_server, vae_server, llm_server, store):
    o = Orchestrator(settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}"), store)
    yield o
    o.close()


def wait_job(o: Orchestrator, job_id: str, predicate, timeout: float = 60.0) -> jobs_pb2.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = o.jobs.get(job_id)
        if predicate(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck: {job}"
        time.sleep(0.05)


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def job_keys(o: Orchestrator) -> set[bytes]:
    return {k for k in o.jobs.r.scan_iter("bagel:job:*") if not k.endswith((b":events", b":lease"))}


# ---- the three workflows ---------------------------------------------------------------------------
def test_http_text_to_image_equals_in_process(orch, clients):
    body = {"workflow": "generate", "prompt": "a red boat on a lake",
            "image_params": {"width": 64, "height": 48, "num_timesteps": 4, "seed": 21}}
    r = orch.http.post("/v1/jobs", params={"wait": 60}, json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["attempts"] == 1
    assert (job["result"]["width"], job["result"]["height"], job["result"]["seed"]) == (64, 48, "21")
    png = orch.http.get(f"/v1/jobs/{job['id']}/image")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    want = wf.generate(clients, "a red boat on a lake", ImageParams(width=64, height=48, num_timesteps=4, seed=21))
    assert np.array_equal(decode_png(png.content), want.pixels)


def test_http_events_follow_a_job_to_its_end(orch):
    # The job is recorded but not queued, and runs only once the stream has delivered its first event: a
    # small job queued at once can end before the stream opens, and then only its ending is seen.
    request = jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="watch me",
                                        image_params={"width": 32, "height": 32, "num_timesteps": 5})
    job_id = orch.jobs.create(request).job.id
    runner = threading.Thread(target=execute, args=(job_id, orch.app.bagel_runtime))
    events = []
    with orch.http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                if len(events) == 1:
                    runner.start()
    runner.join(timeout=60)
    assert events[0]["id"] == job_id and events[0]["state"] == "JOB_STATE_QUEUED"
    assert events[-1]["state"] == "JOB_STATE_SUCCEEDED"
    steps = [e["progress"].get("step", 0) for e in events if e["progress"]["stage"] == "denoise"]
    assert steps == sorted(steps) and steps[-1] == 4  # 5 timesteps = 4 model steps, in order
    assert orch.http.get("/v1/jobs/0123abcd/events").status_code == 404


def test_grpc_run_streams_an_edit_and_equals_in_process(orch, clients, store):
    image = noise_image(24, 24, seed=9)  # the VAE resize makes it 512x512
    updates = list(orch.stub.Run(jobs_pb2.SubmitJobRequest(
        workflow=jobs_pb2.WORKFLOW_EDIT, image=png_bytes(image), prompt="make it blue",
        image_params={"num_timesteps": 3, "seed": 4}, inline_image=True), timeout=120))
    states = [u.state for u in updates]
    assert states[0] == QUEUED and states[-1] == SUCCEEDED and RUNNING in states
    denoise = [u.progress.step for u in updates if u.progress.stage == "denoise"]
    assert denoise and denoise == sorted(denoise) and max(denoise) == 2  # 3 timesteps = 2 model steps
    final = updates[-1]
    want = wf.edit(clients, image, "make it blue", wf.edit_params(image, num_timesteps=3, seed=4))
    assert (final.result.width, final.result.height) == (512, 512)
    assert np.array_equal(decode_png(final.result.image_png), want.pixels)
    # Its input, features and latents are deleted once it ends; the output stays until the record expires.
    assert final.result.image_key == f"jobs/{final.id}/output.png"
    wait_until(lambda: store.keys(f"jobs/{final.id}/") == [final.result.image_key])


def test_a_run_sees_every_change_even_of_a_job_that_ends_at_once(orch):
    """Run subscribes before the job is queued: a caller that reads its updates only after the job has
    ended (a fast worker, a slow caller) still gets every change, in order, starting QUEUED."""
    request = jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="quick",
                                        image_params={"width": 32, "height": 32, "num_timesteps": 4})
    job, updates = orch.gateway.run(request)
    wait_job(orch, job.id, lambda j: j.state == SUCCEEDED)
    seen = list(updates)
    assert [u.state for u in seen][:2] == [QUEUED, RUNNING] and seen[-1].state == SUCCEEDED
    assert seen[-2].progress.stage == "decode"  # the last change before the end
    assert [u.progress.step for u in seen if u.progress.stage == "denoise"][-1] == 3


def test_grpc_submit_then_watch_an_understanding_job(orch, clients, store):
    image = noise_image(24, 24, seed=3)
    job = orch.stub.Submit(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_UNDERSTAND, image=png_bytes(image),
                                                     prompt="what is this?", think=True,
                                                     text_params={"max_new_tokens": 5}))
    assert job.state == QUEUED and job.id
    final = list(orch.stub.Watch(jobs_pb2.GetJobRequest(id=job.id), timeout=60))[-1]
    want = wf.understand(clients, image, "what is this?", TextParams(max_new_tokens=5), think=True)
    assert final.state == SUCCEEDED
    assert (final.result.text, final.result.think, final.result.tokens) == (want.text, want.think or "", want.tokens)
    assert orch.stub.Get(jobs_pb2.GetJobRequest(id=job.id)) == final
    wait_until(lambda: store.keys(f"jobs/{job.id}/") == [])  # an answer leaves no object behind


def test_an_answer_streams_as_it_is_decoded(orch, clients):
    """Watch shows the answer growing: each update's text is a prefix of the final answer."""
    image = noise_image(24, 24, seed=13)
    updates = list(orch.stub.Run(jobs_pb2.SubmitJobRequest(
        workflow=jobs_pb2.WORKFLOW_UNDERSTAND, image=png_bytes(image), prompt="tell me a story",
        text_params={"max_new_tokens": 40}), timeout=120))
    final = updates[-1]
    want = wf.understand(clients, image, "tell me a story", TextParams(max_new_tokens=40))
    assert final.result.text == want.text
    partial = [u.progress.text for u in updates if u.progress.stage == "answer"]
    assert partial and any(partial) and all(want.text.startswith(t) for t in partial)
    if want.tokens == 40:  # the budget's last token is never throttled away (an early end may be)
        assert partial[-1] == want.text


def test_http_multipart_upload_equals_the_json_request(orch, clients):
    image = noise_image(20, 30, seed=8)
    request = {"workflow": "understand", "prompt": "describe it", "text_params": {"max_new_tokens": 3}}
    r = orch.http.post("/v1/jobs", params={"wait": 60}, data={"request": json.dumps(request)},
                       files={"image": ("cat.png", png_bytes(image), "image/png")})
    assert r.status_code == 200, r.text
    want = wf.understand(clients, image, "describe it", TextParams(max_new_tokens=3))
    assert r.json()["result"]["text"] == want.text
    bad = orch.http.post("/v1/jobs", data={"request": "{nope"}, files={"image": ("a.png", b"x", "image/png")})
    assert bad.status_code == 400 and "not JSON" in bad.json()["message"]
    both = orch.http.post("/v1/jobs", data={"request": json.dumps({**request, "image_key": "uploads/cat.png"})},
                          files={"image": ("a.png", png_bytes(image), "image/png")})
    assert both.status_code == 400 and "not both" in both.json()["message"]


def test_an_image_already_in_the_bucket_is_taken_by_key(orch, store, clients):
    image = noise_image(20, 30, seed=5)
    store.put_bytes("uploads/cat.png", png_bytes(image))
    job = orch.http.post("/v1/jobs", params={"wait": 60}, json={
        "workflow": "understand", "image_key": "uploads/cat.png", "prompt": "describe",
        "text_params": {"max_new_tokens": 3}}).json()
    want = wf.understand(clients, image, "describe", TextParams(max_new_tokens=3))
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["result"]["text"] == want.text


def test_image_key_reads_only_uploads_and_hides_which_other_keys_exist(orch, store):
    # Another job's output exists; naming it must answer exactly like naming nothing at all.
    first = orch.http.post("/v1/jobs", params={"wait": 60}, json={
        "workflow": "understand", "image": b64(png_bytes(noise_image(16, 16, seed=2))), "prompt": "x",
        "text_params": {"max_new_tokens": 1}}).json()
    theirs = f"jobs/{first['id']}/output.png"
    store.put_bytes(theirs, png_bytes(noise_image(16, 16, seed=3)))
    store.put_bytes("elsewhere/cat.png", png_bytes(noise_image(16, 16, seed=3)))
    before = job_keys(orch)

    def submit(key):
        return orch.http.post("/v1/jobs", json={"workflow": "edit", "image_key": key, "prompt": "x"})

    missing = submit("uploads/nothing-here.png")
    assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"
    assert "no such input object" in missing.json()["message"]
    for key in (theirs, "elsewhere/cat.png", f"jobs/{first['id']}/missing.png"):
        r = submit(key)
        assert (r.status_code, r.content) == (missing.status_code, missing.content), key
    err = expect_status(grpc.StatusCode.NOT_FOUND, orch.stub.Submit, jobs_pb2.SubmitJobRequest(
        workflow=jobs_pb2.WORKFLOW_EDIT, image_key=theirs, prompt="x"))
    assert err.details() == missing.json()["message"]
    assert store.exists(theirs) and job_keys(orch) == before  # it was there all along; nothing was accepted


# ---- refusals: nothing accepted, a clear code ---------------------------------------------------------
def test_bad_requests_are_refused_before_a_job_exists(orch, monkeypatch):
    before = job_keys(orch)
    ok_image = b64(png_bytes(noise_image(16, 16)))
    cases = [
        ({"workflow": "edit", "image": b64(b"not an image"), "prompt": "x"}, 400, "cannot"),
        ({"workflow": "generate", "prompt": "x", "image_params": {"width": 1000}}, 400, "multiple of 16"),
        ({"workflow": "generate", "prompt": "x", "image_params": {"num_timesteps": 1}}, 400, "num_timesteps"),
        ({"workflow": "generate", "prompt": "x", "image_params": {"cfg_interval_lo": 0.9, "cfg_interval_hi": 0.1}},
         400, "cfg_interval"),
        ({"workflow": "understand", "image": ok_image, "prompt": "x", "text_params": {"top_p": 2}}, 400, "top_p"),
        ({"workflow": "edit", "image": ok_image, "prompt": "x", "image_params": {"width": 64}}, 400, "leave it unset"),
        ({"workflow": "understand", "prompt": "x"}, 400, "needs an input image"),
        ({"workflow": "generate", "prompt": "  "}, 400, "prompt"),
        ({"workflow": "generate", "prompt": "x" * 70000}, 400, "characters; the limit"),
        # Under the character cap but over the model's 32768 positions once tokenized (~64k tokens).
        ({"workflow": "generate", "prompt": "".join(chr(0x4E00 + i * 7919 % 20000) for i in range(40000))},
         400, "context tokens"),
        ({"workflow": "paint", "prompt": "x"}, 400, "bad request body"),
        ({"workflow": "generate", "prompt": "x", "colour": "red"}, 400, "colour"),
        ({"workflow": "edit", "image_key": "uploads/missing.png", "prompt": "x"}, 404, "no such input object"),
        ({"workflow": "edit", "image_key": "../etc/passwd", "prompt": "x"}, 400, "key"),
        ({"workflow": "generate", "prompt": "x", "deadline_seconds": 10 ** 7}, 400, "deadline_seconds"),
        # both image sources: the request is wrong whether or not the key exists (not 404)
        ({"workflow": "edit", "image": ok_image, "image_key": "uploads/missing.png", "prompt": "x"}, 400, "not both"),
        ({"workflow": "generate", "prompt": "x", "idempotency_key": "k" * 5000}, 400, "idempotency_key"),
        ({"workflow": "understand", "prompt": "x", "session_id": "s", "session_ttl_seconds": 86401}, 400,
         "session_ttl_seconds"),
    ]
    for body, status, message in cases:
        r = orch.http.post("/v1/jobs", json=body)
        assert r.status_code == status, (body, r.text)
        assert message in r.json()["message"], (body, r.text)
    assert orch.http.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
                          ).status_code == 400
    deep = orch.http.post("/v1/jobs", content=b"[" * 100_000 + b"]" * 100_000,
                          headers={"content-type": "application/json; charset=utf-8"})
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["message"], deep.text
    body = json.dumps({"workflow": "generate", "prompt": "x"}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        r = orch.http.post("/v1/jobs", content=body, headers={"content-type": content_type} if content_type else {})
        assert r.status_code == 415 and r.json()["code"] == "INVALID_ARGUMENT", (content_type, r.text)
    with_params = orch.http.post("/v1/jobs", content=json.dumps({"workflow": "generate"}).encode(),
                                 headers={"content-type": "application/json; charset=utf-8"})
    assert with_params.status_code == 400 and "prompt" in with_params.json()["message"]  # read as JSON
    assert orch.http.post("/v1/jobs", params={"wait": -1}, json={"workflow": "generate", "prompt": "x"}
                          ).status_code == 400
    monkeypatch.setattr(http_api, "MAX_BODY_BYTES", 1000)
    r = orch.http.post("/v1/jobs", json={"workflow": "understand", "prompt": "x", "image": "A" * 2000})
    assert r.status_code == 413
    chunked = (part for part in [b'{"workflow": "understand", "prompt": "', b"x" * 2000, b'"}'])
    r = orch.http.post("/v1/jobs", content=chunked, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["message"]  # no Content-Length to trust
    err = expect_status(grpc.StatusCode.INVALID_ARGUMENT, orch.stub.Submit,
                        jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_EDIT, image=b"\x89PNG broken", prompt="x"))
    assert "image" in err.details()
    err = expect_status(grpc.StatusCode.INVALID_ARGUMENT, orch.stub.Submit,
                        jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_EDIT, image=png_bytes(noise_image(16, 16)),
                                                  image_key="uploads/missing.png", prompt="x"))
    assert "not both" in err.details()
    assert job_keys(orch) == before  # nothing was accepted


def test_unknown_jobs_are_not_found(orch):
    for path in ("/v1/jobs/0123abcd", "/v1/jobs/0123abcd/image", "/v1/jobs/not-a-hex-id!"):
        r = orch.http.get(path)
        assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND", path
    assert orch.http.post("/v1/jobs/0123abcd/cancel").status_code == 404
    for call in (orch.stub.Get, orch.stub.Cancel):
        expect_status(grpc.StatusCode.NOT_FOUND, call, jobs_pb2.GetJobRequest(id="0123abcd"))
    expect_status(grpc.StatusCode.NOT_FOUND, lambda r: list(orch.stub.Watch(r)), jobs_pb2.GetJobRequest(id="ab"))


def test_an_understanding_job_has_no_image(orch):
    job = orch.http.post("/v1/jobs", params={"wait": 60}, json={
        "workflow": "understand", "image": b64(png_bytes(noise_image(16, 16))), "prompt": "x",
        "text_params": {"max_new_tokens": 2}}).json()
    r = orch.http.get(f"/v1/jobs/{job['id']}/image")
    assert r.status_code == 409 and "answers text" in r.json()["message"]


# ---- delivery guarantees ---------------------------------------------------------------------------
def test_the_same_idempotency_key_gives_the_same_job(orch):
    body = {"workflow": "generate", "prompt": "once", "idempotency_key": "client-42-try",
            "image_params": {"width": 32, "height": 32, "num_timesteps": 2, "seed": 1}}
    first = orch.http.post("/v1/jobs", json=body).json()
    second = orch.http.post("/v1/jobs", json=body).json()
    assert first["id"] == second["id"]
    done = orch.http.get(f"/v1/jobs/{first['id']}", params={"wait": 60}).json()
    assert done["state"] == "JOB_STATE_SUCCEEDED" and done["attempts"] == 1  # ran once


def test_cancelling_a_running_job_stops_it_and_frees_the_llm(orch, llm_server):
    job = orch.stub.Submit(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="slow",
                                                     image_params={"width": 512, "height": 512,
                                                                   "num_timesteps": 400, "seed": 2}))
    wait_job(orch, job.id, lambda j: j.progress.stage == "denoise" and j.progress.step >= 1)
    assert orch.stub.Cancel(jobs_pb2.GetJobRequest(id=job.id)).state == RUNNING  # asked; stops at a step
    final = wait_job(orch, job.id, lambda j: j.state in (CANCELLED, SUCCEEDED, FAILED), timeout=30)
    assert final.state == CANCELLED and final.error.code == "CANCELLED"
    assert final.progress.step < 399 if final.progress.stage == "denoise" else True
    assert llm_kv_blocks_left(llm_server) == 0


def test_a_running_job_past_its_deadline_stops_deadline_exceeded(orch, llm_server):
    body = {"workflow": "generate", "prompt": "too late", "deadline_seconds": 3,
            "image_params": {"width": 256, "height": 256, "num_timesteps": 1000, "seed": 3}}  # ~10 s of steps
    job = orch.http.post("/v1/jobs", json=body).json()
    assert job["deadline_at"] == pytest.approx(job["created_at"] + 3)
    final = orch.http.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
    assert final["state"] == "JOB_STATE_FAILED" and final["error"]["code"] == "DEADLINE_EXCEEDED"
    assert "3 s" in final["error"]["message"] and final["started_at"] > 0  # it ran, and was stopped
    assert 3 <= final["finished_at"] - final["created_at"] < 10
    assert llm_kv_blocks_left(llm_server) == 0


def test_a_queued_job_cancelled_never_runs(orch, redis_server):
    store_only = JobStore.from_url(redis_server.url)
    created = store_only.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="x"))
    assert store_only.request_cancel(created.job.id).state == CANCELLED
    execute(created.job.id, orch.app.bagel_runtime)  # a late delivery does nothing
    assert store_only.get(created.job.id).attempts == 0


def test_a_model_service_that_comes_back_is_retried_not_lost(redis_server, vit_server, vae_server, store,
                                                             tiny_ckpt):
    from services.common.rpc import ServerOptions
    from services.dev.ports import free_port
    from services.llm import server as llm_server_module

    port = free_port()
    # Each orchestrator with workers of its own gets its own Redis database (its own queue).
    o = Orchestrator(settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{port}", max_retries=20,
                                  redis_url=redis_server.url[:-1] + "1"), store)
    late = None
    try:
        job = o.stub.Submit(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="patience",
                                                      image_params={"width": 32, "height": 32, "num_timesteps": 2}))
        queued_again = wait_job(o, job.id, lambda j: j.attempts >= 2 and j.state == QUEUED)
        assert queued_again.error.code == "UNAVAILABLE"  # the reason is visible while it waits
        late = llm_server_module.build_server(ServerOptions(host="127.0.0.1", port=port, drain_seconds=0.0),
                                              tiny_ckpt.config, store)
        late.start()
        late.load(lambda: llm_server_module.load_engine(tiny_ckpt, kv_cache_tokens=4096))
        final = wait_job(o, job.id, lambda j: j.state in (SUCCEEDED, FAILED), timeout=90)
        assert final.state == SUCCEEDED and final.attempts >= 2 and not final.HasField("error")
    finally:
        o.close()
        if late is not None:
            late.stop(grace=0, drain_seconds=0)


def test_retries_run_out_into_a_failed_job(redis_server, vit_server, vae_server, store):
    from services.dev.ports import free_port

    o = Orchestrator(settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{free_port()}", max_retries=1,
                                  redis_url=redis_server.url[:-1] + "2"), store)
    try:
        job = o.http.post("/v1/jobs", json={"workflow": "generate", "prompt": "nobody home",
                                            "image_params": {"width": 32, "height": 32, "num_timesteps": 2}}).json()
        final = o.http.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
        assert final["state"] == "JOB_STATE_FAILED" and final["error"]["code"] == "UNAVAILABLE"
        assert final["attempts"] == 2 and "after 2 attempts" in final["error"]["message"]
    finally:
        o.close()


# ---- the gateway's own limits ------------------------------------------------------------------------
def test_auth_token_is_required_on_both_fronts(redis_server, vit_server, vae_server, llm_server, store):
    o = Orchestrator(settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}"), store,
                     worker=False, auth_token="s3cret")
    try:
        body = {"workflow": "generate", "prompt": "x"}
        assert o.http.post("/v1/jobs", json=body).status_code == 401
        assert o.http.post("/v1/jobs", json=body, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert o.http.get("/healthz").status_code == 200  # probes need no token
        r = o.http.get("/v1/jobs/0123abcd", headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 404  # through auth, then not found
        expect_status(grpc.StatusCode.UNAUTHENTICATED, o.stub.Get, jobs_pb2.GetJobRequest(id="0123abcd"))
        expect_status(grpc.StatusCode.NOT_FOUND, o.stub.Get, jobs_pb2.GetJobRequest(id="0123abcd"),
                      metadata=(("authorization", "Bearer s3cret"),))
    finally:
        o.close()


def test_a_full_queue_refuses_new_jobs(redis_server, vit_server, vae_server, llm_server, store):
    # Its own Redis database and no worker: queued jobs stay queued.
    s = settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}",
                     redis_url=redis_server.url[:-1] + "3", max_queued=2)
    o = Orchestrator(s, store, worker=False)
    try:
        body = {"workflow": "generate", "prompt": "x", "image_params": {"width": 32, "height": 32}}
        assert [o.http.post("/v1/jobs", json=body).status_code for _ in range(3)] == [202, 202, 429]
        assert o.jobs.r.llen(QUEUE) == 2
        expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, o.stub.Submit,
                      jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="x"))
    finally:
        o.jobs.r.flushdb()
        o.close()


def test_readiness_follows_redis(redis_server, vit_server, vae_server, llm_server, store):
    from services.dev.ports import free_port

    dead = settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}",
                        redis_url=f"redis://127.0.0.1:{free_port()}/0")
    o = Orchestrator(dead, store, worker=False)
    try:
        assert o.http.get("/healthz").status_code == 200
        r = o.http.get("/readyz")
        assert r.status_code == 503 and "redis" in r.json()["reason"]
        r = o.http.post("/v1/jobs", json={"workflow": "generate", "prompt": "x"})
        assert r.status_code == 503 and r.json()["code"] == "UNAVAILABLE"
    finally:
        o.close()


def test_readiness_names_a_missing_worker_when_one_is_required(redis_server, vit_server, vae_server, llm_server,
                                                               store):
    from services.orchestrator.heartbeat import Heartbeat

    s = settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}",
                     redis_url=redis_server.url[:-1] + "12", ready_requires_worker=True)
    o = Orchestrator(s, store, worker=False)
    try:
        r = o.http.get("/readyz")
        assert r.status_code == 503 and "no worker is consuming the job queue" in r.json()["reason"]
        assert r.json()["workers"] == 0
        # A worker's heartbeat (what every worker process writes from worker_ready on) makes it ready.
        beat = Heartbeat(o.jobs.r, "celery@test", interval_s=1).start()
        try:
            deadline = time.monotonic() + 10
            while (r := o.http.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, r.json()
                time.sleep(0.1)
            assert r.json()["workers"] == 1
        finally:
            beat.stop()
        # A clean shutdown removes the key at once.
        assert o.http.get("/readyz").status_code == 503
    finally:
        o.jobs.r.flushdb()
        o.close()


def test_readiness_fails_while_redis_refuses_writes(redis_server, vit_server, vae_server, llm_server, store):
    # A full Redis (maxmemory reached, noeviction) still answers PING: readiness must try a write.
    s = settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}",
                     redis_url=redis_server.url[:-1] + "8")
    o = Orchestrator(s, store, worker=False)
    r = o.jobs.r
    saved = {k: r.config_get(k)[k] for k in ("maxmemory", "maxmemory-policy")}
    try:
        assert o.http.get("/readyz").status_code == 200
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", 1)
        ready = o.http.get("/readyz")
        assert ready.status_code == 503 and "refuses writes" in ready.json()["reason"]
    finally:
        r.config_set("maxmemory", saved["maxmemory"])
        r.config_set("maxmemory-policy", saved["maxmemory-policy"])
        assert o.http.get("/readyz").status_code == 200
        o.jobs.r.flushdb()
        o.close()


def test_an_accepted_job_whose_message_was_lost_still_runs(redis_server, vit_server, vae_server, llm_server,
                                                            store):
    """Answered 202, then its queue message vanished (say Redis came back without its last writes): a
    worker's janitor sends it again once it has waited `requeue_s`, and it runs to its end."""
    s = settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}",
                     redis_url=redis_server.url[:-1] + "9", sweep_s=1, requeue_s=1)
    o = Orchestrator(s, store, worker=False)
    worker = None
    try:
        r = o.http.post("/v1/jobs", json={"workflow": "generate", "prompt": "found again",
                                          "image_params": {"width": 32, "height": 32, "num_timesteps": 2}})
        assert r.status_code == 202, r.text
        assert o.jobs.r.delete(QUEUE) == 1  # the message is gone; the record says QUEUED
        worker = WorkerProcess(s, store, concurrency=1)
        final = wait_job(o, r.json()["id"], lambda j: j.state in (SUCCEEDED, FAILED, CANCELLED), timeout=90)
        assert final.state == SUCCEEDED and final.attempts == 1
        assert metric_value(worker.scrape(), "bagel_jobs_rescued_total") == 1
    finally:
        if worker is not None:
            worker.stop()
        o.jobs.r.flushdb()
        o.close()


@pytest.mark.parametrize("by", ["janitor", "redelivery"])
def test_a_job_whose_worker_dies_is_taken_over(by, redis_server, vit_server, vae_server, llm_server, store, clients):
    """A worker process killed (SIGKILL) mid-job: its lease lapses, and another worker runs the job to the
    same result. Either the janitor queues it again (visibility timeout an hour), or the broker redelivers
    its unacknowledged message (janitor off)."""
    timing = dict(visibility_timeout_s=3600, sweep_s=1) if by == "janitor" else dict(visibility_timeout_s=4,
                                                                                      sweep_s=3600)
    s = settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}",
                     redis_url=redis_server.url[:-1] + "5", **timing)
    doomed = WorkerProcess(s, store, concurrency=1)
    o = Orchestrator(s, store, worker=False)
    successor = None
    try:
        # Long enough (seconds) that the kill lands mid-denoise even on a loaded machine.
        params = {"width": 512, "height": 512, "num_timesteps": 100, "seed": 77}
        job = o.stub.Submit(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="survive",
                                                      image_params=params))
        wait_job(o, job.id, lambda j: j.progress.stage == "denoise" and j.progress.step >= 2, timeout=90)
        doomed.stop(kill=True)  # SIGKILL: no goodbye, the message stays unacknowledged
        assert o.jobs.get(job.id).state == RUNNING  # as the dead worker left it
        successor = WorkerProcess(s, store, concurrency=1)
        final = wait_job(o, job.id, lambda j: j.state in (SUCCEEDED, FAILED, CANCELLED), timeout=120)
        assert final.state == SUCCEEDED and final.attempts == 2
        want = wf.generate(clients, "survive", ImageParams(**params))
        got = o.http.get(f"/v1/jobs/{job.id}/image").content
        assert np.array_equal(decode_png(got), want.pixels)
        rescued = metric_value(successor.scrape(), "bagel_jobs_rescued_total")
        assert rescued == (1 if by == "janitor" else 0)
    finally:
        doomed.stop(kill=True)
        if successor is not None:
            successor.stop()
        o.jobs.r.flushdb()
        o.close()


def test_a_worker_that_lost_its_lease_stops_without_ending_the_job(orch, monkeypatch):
    """A worker that stalled past its lease (the job may be queued again and running elsewhere) stops
    working on the job and leaves its record to the new owner."""
    original = runner_module.Watcher._progress

    def stall_at_first_denoise_step(watcher, p):
        if p.stage == "denoise" and not watcher.lost.is_set():
            # Stalled while the lease lapsed and another worker took the job: the watcher must notice.
            orch.jobs.r.set(orch.jobs.key(watcher.job_id) + ":lease", "another-worker", px=60_000)
            assert watcher.lost.wait(10)
        original(watcher, p)

    monkeypatch.setattr(runner_module.Watcher, "_progress", stall_at_first_denoise_step)
    request = jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="stalled",
                                        image_params={"width": 64, "height": 64, "num_timesteps": 10})
    job_id = orch.jobs.create(request).job.id  # not queued: only this test's runner takes it
    execute(job_id, orch.app.bagel_runtime)
    job = orch.jobs.get(job_id)
    assert job.state == RUNNING and job.progress.stage == "encode"  # left as it was, for the new owner
    assert orch.jobs.r.get(orch.jobs.key(job_id) + ":lease") == b"another-worker"
    orch.jobs.fail(job_id, "CANCELLED", "test over")


def test_a_synchronous_run_given_up_by_its_caller_is_cancelled(orch):
    request = jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="too slow",
                                        image_params={"width": 512, "height": 512, "num_timesteps": 400})
    seen = []
    with pytest.raises(grpc.RpcError) as info:
        for update in orch.stub.Run(request, timeout=3):
            seen.append(update)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and seen
    final = wait_job(orch, seen[0].id, lambda j: j.state in (CANCELLED, SUCCEEDED, FAILED), timeout=30)
    assert final.state == CANCELLED
    # Watching is not owning: a Watch that times out leaves its job alone.
    job = orch.stub.Submit(request)
    with pytest.raises(grpc.RpcError):
        list(orch.stub.Watch(jobs_pb2.GetJobRequest(id=job.id), timeout=1))
    time.sleep(1)
    assert orch.jobs.get(job.id).state in (QUEUED, RUNNING)
    orch.stub.Cancel(jobs_pb2.GetJobRequest(id=job.id))
    wait_job(orch, job.id, lambda j: j.state == CANCELLED, timeout=30)


def test_a_graceful_gateway_restart_leaves_running_jobs_alone(redis_server, vit_server, vae_server, llm_server,
                                                              store):
    settings = settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}",
                            redis_url=redis_server.url[:-1] + "8")
    o = Orchestrator(settings, store)
    second = None
    try:
        request = jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="through a restart",
                                            image_params={"width": 256, "height": 256, "num_timesteps": 400})
        seen, ended = [], {}

        def run():
            try:
                for update in o.stub.Run(request, timeout=120):
                    seen.append(update)
            except grpc.RpcError as e:
                ended["run"] = e

        runner = threading.Thread(target=run)
        runner.start()
        wait_until(lambda: seen)
        job_id = seen[0].id
        wait_job(o, job_id, lambda j: j.progress.stage == "denoise" and j.progress.step >= 1)
        poller = threading.Thread(target=lambda: ended.setdefault(
            "poll", o.http.get(f"/v1/jobs/{job_id}", params={"wait": 60})))
        poller.start()
        time.sleep(0.5)  # the long poll is open
        started = time.monotonic()
        o.proc.stop()  # what SIGTERM does
        runner.join(30)
        poller.join(30)
        assert time.monotonic() - started < 8  # open waits ended at once, not at the end of the grace periods
        e = ended["run"]
        assert e.code() == grpc.StatusCode.UNAVAILABLE and job_id in e.details()
        assert ("bagel-job-id", job_id) in tuple(e.trailing_metadata())
        poll = ended["poll"]
        assert poll.status_code == 200 and poll.json()["id"] == job_id
        assert poll.json()["state"] in ("JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED")
        # Another gateway on the same Redis follows the job on to its end: it was never cancelled.
        second = Orchestrator(settings, store, worker=False)
        final = list(second.stub.Watch(jobs_pb2.GetJobRequest(id=job_id), timeout=120))[-1]
        assert final.state == SUCCEEDED, final
    finally:
        o.close()
        if second is not None:
            second.close()


def test_settings_from_the_environment_name_the_bad_variable():
    env = {"BAGEL_REDIS_URL": "redis://r:6379/2", "BAGEL_LLM_ADDR": "llm:1", "BAGEL_JOB_MAX_RETRIES": "0",
           "BAGEL_AUTH_TOKEN": "  "}
    s = OrchestratorSettings.from_env(env)
    assert (s.redis_url, s.llm_addr, s.max_retries, s.auth_token) == ("redis://r:6379/2", "llm:1", 0, None)
    assert s.lease_s == OrchestratorSettings().lease_s  # unset: the default
    # What the local stack and the tests hand to worker processes reads back as the same settings.
    custom = OrchestratorSettings(redis_url="redis://x:1/4", vit_addr="v:1", auth_token="t", lease_s=7,
                                  visibility_timeout_s=9, max_retries=0, call_timeout_s=11, job_ttl_s=61,
                                  max_queued=3, sweep_s=2)
    assert OrchestratorSettings.from_env(custom.to_env()) == custom
    for name, value, message in (("BAGEL_JOB_LEASE_SECONDS", "0", "must be at least 1"),
                                 ("BAGEL_MAX_QUEUED_JOBS", "many", "must be an integer"),
                                 ("BAGEL_JOB_TTL_SECONDS", "5", "must be at least 60")):
        with pytest.raises(ValueError, match=f"{name} {message}"):
            OrchestratorSettings.from_env({name: value})


def test_jobs_in_one_session_continue_one_conversation(orch, clients, engine):
    """Turn 1 asks about an image, turn 2 asks a follow-up without it: through the job API (the LLM
    service keeps the session) the answers equal the engine's own two-turn session in-process."""
    from services.common.images import vae_resize
    from services.common.contracts import TextItem
    from services.llm.sessions import InProcessLLM

    image = noise_image(24, 24, seed=12)
    turns = [({"image": b64(png_bytes(image))}, "what is in it?"),
             ({"session_resume": True}, "and what colour is it?")]  # a later turn says so
    got = []
    for extra, prompt in turns:
        job = orch.http.post("/v1/jobs", params={"wait": 60}, json={
            "workflow": "understand", "prompt": prompt, "session_id": "chat-7", "session_ttl_seconds": 60,
            "text_params": {"max_new_tokens": 4}, **extra}).json()
        assert job["state"] == "JOB_STATE_SUCCEEDED", job
        got.append(job["result"]["text"])

    in_process = InProcessLLM(engine)
    (vit,) = clients.vit.encode([vae_resize(image)])
    want = [in_process.understand(items, TextParams(max_new_tokens=4), session=SessionRef("chat-7")).text
            for items in ([vit, TextItem("what is in it?")], [TextItem("and what colour is it?")])]
    in_process.sessions.close()
    assert got == want
    # Without the session the follow-up has no image to talk about: refused at the door.
    r = orch.http.post("/v1/jobs", json={"workflow": "understand", "prompt": "and what colour is it?"})
    assert r.status_code == 400 and "session" in r.json()["message"]
    r = orch.http.post("/v1/jobs", json={"workflow": "understand", "prompt": "x", "session_id": "bad\nid"})
    assert r.status_code == 400 and "session_id" in r.json()["message"]
    # Ending it: once (its KV blocks go at once), then it is unknown, over both fronts.
    assert orch.http.delete("/v1/sessions/chat-7").json() == {"deleted": True}
    r = orch.http.delete("/v1/sessions/chat-7")
    assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"
    expect_status(grpc.StatusCode.NOT_FOUND, orch.stub.DeleteSession, llm_pb2.DeleteSessionRequest(session_id="nope"))
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, orch.stub.DeleteSession,
                  llm_pb2.DeleteSessionRequest(session_id="x" * 300))
    # A follow-up of a session the LLM service no longer has (ended, expired, lost in its restart) fails
    # instead of answering without the conversation; a first turn of the same id starts a new one.
    follow_up = jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_UNDERSTAND, prompt="and its colour?",
                                          session_id="chat-7", session_resume=True,
                                          text_params={"max_new_tokens": 2})
    final = list(orch.stub.Run(follow_up, timeout=60))[-1]
    assert final.state == FAILED and final.error.code == "FAILED_PRECONDITION", final
    assert "chat-7" in final.error.message and "gone" in final.error.message
    r = orch.http.post("/v1/jobs", json={"workflow": "understand", "prompt": "x", "session_resume": True,
                                         "image": b64(png_bytes(image))})
    assert r.status_code == 400 and "session_resume" in r.json()["message"]


def test_metrics_count_submissions_and_finished_jobs(orch):
    def gateway(result):
        return metric_value(scrape(orch.metrics_port), "bagel_jobs_submitted_total", workflow="generate",
                            result=result)

    def worker(name, **labels):
        return metric_value(orch._worker.scrape(), name, workflow="generate", **labels)

    before = {r: gateway(r) for r in ("accepted", "duplicate", "refused")}
    done_before = worker("bagel_jobs_finished_total", state="succeeded")
    body = {"workflow": "generate", "prompt": "count me", "idempotency_key": "metrics-1",
            "image_params": {"width": 32, "height": 32, "num_timesteps": 2}}
    job = orch.http.post("/v1/jobs", json=body).json()
    orch.http.post("/v1/jobs", json=body)
    orch.http.post("/v1/jobs", json={**body, "idempotency_key": "", "image_params": {"width": 33}})
    assert orch.http.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()["state"] == "JOB_STATE_SUCCEEDED"
    assert {r: gateway(r) - before[r] for r in before} == {"accepted": 1, "duplicate": 1, "refused": 1}
    assert metric_value(scrape(orch.metrics_port), "bagel_jobs_queued") >= 0
    deadline = time.monotonic() + 10  # the worker counts just after it records the end
    while worker("bagel_jobs_finished_total", state="succeeded") == done_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker("bagel_jobs_finished_total", state="succeeded") == done_before + 1
    assert worker("bagel_job_seconds_count", state="succeeded") >= 1
