"""`bagel_serve.client` against the real local stack (Redis, S3, the three model servers, a Celery worker,
the gateway on real ports), over HTTP and gRPC. Results equal the in-process workflows on the same tiny
checkpoint and seeds."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from bagel_serve.client import (AsyncClient, Cancelled, Client, DeadlineExceeded, ImageResult, InvalidArgument,
                                JobFailed, JobState, NotFound, TextResult, Unauthenticated)
from client_stack import TOKEN
from service_helpers import llm_kv_blocks_left, noise_image, png_bytes
from services.common.contracts import ImageParams, SessionRef, TextParams
from services.common.protos import jobs_pb2
from services.orchestrator import workflows as wf
from services.orchestrator.runner import execute

SMALL = {"width": 32, "height": 32, "steps": 3}
# Long enough to be caught running (~10 s of denoising on the tiny model), stopped within a step.
LONG = {"width": 256, "height": 256, "steps": 1000, "seed": 1}


@pytest.fixture(scope="module", params=["http", "grpc"])
def client(request, urls):
    with Client(urls[request.param], token=TOKEN, timeout=60) as c:
        assert c.transport == request.param
        yield c


def pixels(result: ImageResult) -> np.ndarray:
    return np.asarray(result.image.convert("RGB"))


MODEL_CODE = ("services.llm", "services.vit", "services.vae", "services.attention")


@pytest.mark.parametrize("code, unwanted", [
    ("from bagel_serve.client import Client; Client('http://127.0.0.1:1'); Client('grpc://127.0.0.1:1')",
     MODEL_CODE + ("services.orchestrator",)),  # the client reuses nothing of the server but the protos
    # the whole remote command, up to the refusal (nothing listens on port 1)
    ("import services.cli; assert services.cli.main(['jobs', 'get', 'x', '--url', 'grpc://127.0.0.1:1']) == 1",
     MODEL_CODE)])
def test_the_client_and_the_remote_cli_load_no_torch_and_no_model_code(code, unwanted):
    code += "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       timeout=60).stdout.splitlines()[-1])
    heavy = [m for m in loaded if m.split(".")[0] in ("torch", "triton", "safetensors") or m.startswith(unwanted)]
    assert heavy == [] and "grpc" in loaded and "httpx" in loaded


# ---- the three workflows -----------------------------------------------------------------------------
def test_generate_equals_in_process(client, clients):
    out = client.generate("a red boat", **SMALL, seed=5, wait=True, timeout=60)
    want = wf.generate(clients, "a red boat", ImageParams(width=32, height=32, num_timesteps=3, seed=5))
    assert isinstance(out, ImageResult) and (out.width, out.height, out.seed, out.think) == (32, 32, 5, "")
    assert np.array_equal(pixels(out), want.pixels)


@pytest.fixture(scope="module")
def edit_reference(clients):
    """An edit run in-process once for both transports (an edit's output is 512x512 at least: slow)."""
    image = noise_image(24, 24, seed=9)
    return image, wf.edit(clients, image, "make it blue", wf.edit_params(image, num_timesteps=3, seed=4))


def test_edit_from_a_file_equals_in_process(client, edit_reference, tmp_path):
    image, want = edit_reference
    image.save(tmp_path / "in.png")
    job = client.edit(tmp_path / "in.png", "make it blue", steps=3, seed=4)
    assert job.state is JobState.QUEUED and job.workflow == "edit"
    out = job.result(timeout=120)  # the handle waits through its client
    assert (out.width, out.height) == want.to_pil().size and np.array_equal(pixels(out), want.pixels)


def test_understand_with_think_equals_in_process(client, clients):
    image = noise_image(24, 24, seed=3)
    out = client.understand(png_bytes(image), "what is this?", think=True, max_new_tokens=5, wait=True)
    want = wf.understand(clients, image, "what is this?", TextParams(max_new_tokens=5), think=True)
    assert isinstance(out, TextResult) and (out.text, out.think, out.tokens) == (want.text, want.think or "", want.tokens)


def test_a_session_continues_one_conversation(client, clients, engine):
    """Turn 1 with the image, turn 2 without it: the answers equal the engine's own two-turn session."""
    from services.common.contracts import TextItem
    from services.common.images import vae_resize
    from services.llm.sessions import InProcessLLM

    session = f"chat-{client.transport}"
    image = noise_image(24, 24, seed=12)
    got = [client.understand(image, "what is in it?", session=session, session_ttl_s=60, max_new_tokens=4,
                             wait=True).text,
           client.understand(None, "and what colour is it?", session=session, max_new_tokens=4, wait=True).text]
    in_process = InProcessLLM(engine)
    (vit,) = clients.vit.encode([vae_resize(image)])
    want = [in_process.understand(items, TextParams(max_new_tokens=4), session=SessionRef("chat")).text
            for items in ([vit, TextItem("what is in it?")], [TextItem("and what colour is it?")])]
    in_process.sessions.close()
    assert got == want
    client.delete_session(session)
    with pytest.raises(NotFound):  # ended: nothing left to delete, and no image for a follow-up
        client.delete_session(session)
    with pytest.raises(InvalidArgument, match="session"):
        client.understand(None, "and what colour is it?")


# ---- following and stopping jobs ---------------------------------------------------------------------
def test_watch_reports_every_change_in_order(client, stack):
    # Recorded but not queued: it runs once the watch has seen its first event, so nothing is missed.
    request = jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="watch me",
                                        image_params={"width": 32, "height": 32, "num_timesteps": 5})
    job_id = stack.jobs.create(request).job.id
    runner = threading.Thread(target=execute, args=(job_id, stack.app.bagel_runtime))
    events = []
    for p in client.watch(job_id):
        events.append(p)
        if len(events) == 1:
            runner.start()
    runner.join(timeout=60)
    states = [p.state for p in events]
    assert states[0] is JobState.QUEUED and states[-1] is JobState.SUCCEEDED and JobState.RUNNING in states
    order = [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    assert [order.index(s) for s in states] == sorted(order.index(s) for s in states)
    steps = [p.step for p in events if p.stage == "denoise"]
    assert steps == sorted(steps) and steps[-1] == 4 and events[-1].total == events[-1].job.total
    assert all(p.job_id == job_id for p in events)


def test_cancel_stops_a_running_job(client, llm_server):
    job = client.generate("slow", **LONG)
    for p in job.watch():
        if p.stage == "denoise" and p.step >= 1:
            break
    assert client.cancel(job.id).state is JobState.RUNNING  # asked: it stops at its next step
    with pytest.raises(Cancelled) as info:
        client.result(job.id, timeout=30)
    assert info.value.code == "CANCELLED" and info.value.job.state is JobState.CANCELLED
    assert client.get(job.id).step < 999
    assert llm_kv_blocks_left(llm_server) == 0


def test_a_job_past_its_deadline_fails_deadline_exceeded(client):
    job = client.generate("too late", **LONG, deadline_s=1)
    assert job.deadline_at == pytest.approx(job.created_at + 1)
    with pytest.raises(DeadlineExceeded) as info:
        job.result(timeout=30)
    assert isinstance(info.value, JobFailed) and info.value.code == "DEADLINE_EXCEEDED"
    assert client.get(job.id).state is JobState.FAILED


def test_waiting_less_than_the_job_takes_is_deadline_exceeded_not_a_failure(client):
    job = client.generate("slow", **LONG)
    with pytest.raises(DeadlineExceeded) as info:
        client.wait(job.id, timeout=0.5)
    assert not isinstance(info.value, JobFailed)
    assert client.cancel(job.id).id == job.id
    assert client.wait(job.id, timeout=30).state is JobState.CANCELLED


def test_the_same_idempotency_key_gives_the_same_job(client):
    key = f"once-{client.transport}"
    first = client.generate("once", **SMALL, seed=8, idempotency_key=key)
    again = client.generate("once", **SMALL, seed=8, idempotency_key=key)
    assert first.id == again.id and client.wait(first.id, timeout=60).attempts == 1


# ---- errors ------------------------------------------------------------------------------------------
def test_bad_input_is_invalid_argument(client, tmp_path):
    with pytest.raises(InvalidArgument, match="width"):
        client.generate("x", width=33, height=32)
    with pytest.raises(InvalidArgument) as info:
        client.understand(b"not an image", "what?")
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(NotFound):
        client.get("0123abcd")
    with pytest.raises(FileNotFoundError):
        client.edit(tmp_path / "missing.png", "x")


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_missing_or_wrong_token_is_unauthenticated(urls, transport, token):
    with Client(urls[transport], token=token) as c:
        with pytest.raises(Unauthenticated) as info:
            c.generate("x", **SMALL)
    assert info.value.code == "UNAUTHENTICATED"


# ---- asyncio -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_async_client_generates_watches_and_cancels(urls, transport, clients):
    async def scenario():
        async with AsyncClient(urls[transport], token=TOKEN) as c:
            out = await c.generate("a red boat", **SMALL, seed=6, wait=True)
            job = await c.generate("slow", **LONG)
            seen = []
            async for p in job.watch():
                seen.append(p)
                if p.stage == "denoise" and p.step >= 1:
                    break
            await job.cancel()
            with pytest.raises(Cancelled):
                await c.result(job.id, timeout=30)
            return out, seen

    out, seen = asyncio.run(scenario())
    want = wf.generate(clients, "a red boat", ImageParams(width=32, height=32, num_timesteps=3, seed=6))
    assert np.array_equal(pixels(out), want.pixels) and out.seed == 6
    assert seen[-1].state is JobState.RUNNING and seen[-1].stage == "denoise"
    assert {p.state for p in seen} <= {JobState.QUEUED, JobState.RUNNING}
