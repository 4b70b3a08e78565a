"""The OpenAI-compatible API through the official `openai` SDK, against the real local stack (Redis, S3,
the three model servers, a Celery worker, the gateway on real ports). Results equal the same request
through the job API and the in-process workflows on the same tiny checkpoint and seed."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from orchestra import Orchestrator, settings_for
from service_helpers import noise_image, png_bytes
from services.common.contracts import ImageParams, TextParams
from services.common.protos import jobs_pb2
from services.orchestrator import workflows as wf
from services.orchestrator.gateway import http_api

TOKEN = "sk-bagel-test"
MODEL = "bagel-tiny"
FAST = {"num_inference_steps": 3}  # BAGEL's extras travel in the SDK's extra_body


@pytest.fixture(scope="module")
def stack(redis_server, vit_server, vae_server, llm_server, store):
    o = Orchestrator(settings_for(redis_server, vit_server, vae_server, f"127.0.0.1:{llm_server.port}",
                                  model_name=MODEL), store, auth_token=TOKEN)
    yield o
    o.close()


@pytest.fixture(scope="module")
def client(stack):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{stack.proc.http_port}/v1", api_key=TOKEN, max_retries=0,
                       timeout=120) as c:
        yield c


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_models_list_names_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_generate_equals_the_job_api_and_in_process(client, stack, clients):
    out = client.images.generate(model=MODEL, prompt="a red boat", size="32x48", n=2,
                                 extra_body={**FAST, "seed": 40})
    assert out.size == "32x48" and out.output_format == "png"
    got = [pixels(base64.b64decode(d.b64_json)) for d in out.data]
    for i, image in enumerate(got):  # n images = n jobs with seeds seed..seed+n-1
        want = wf.generate(clients, "a red boat", ImageParams(width=32, height=48, num_timesteps=3, seed=40 + i))
        assert image.shape == (48, 32, 3) and np.array_equal(image, want.pixels)
    assert not np.array_equal(got[0], got[1])
    job = stack.http.post("/v1/jobs", params={"wait": 60}, headers={"authorization": f"Bearer {TOKEN}"}, json={
        "workflow": "generate", "prompt": "a red boat", "image_params": {
            "width": 32, "height": 48, "num_timesteps": 3, "seed": 40}}).json()
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["result"]["image_url"].startswith("http") and job["result"]["image_url_expires_at"] > time.time()
    via_jobs = httpx.get(job["result"]["image_url"])  # presigned: the URL alone is the credential
    assert np.array_equal(pixels(via_jobs.content), got[0])


@pytest.mark.parametrize("fmt, pil", [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_formats_and_urls(client, fmt, pil):
    out = client.images.generate(model=MODEL, prompt="a cat", size="32x32", output_format=fmt,
                                 output_compression=80 if fmt != "png" else None,
                                 extra_body={**FAST, "seed": 3})
    image = Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json)))
    assert image.format == pil and image.size == (32, 32)
    url = client.images.generate(model=MODEL, prompt="a cat", size="32x32", output_format=fmt,
                                 response_format="url", extra_body={**FAST, "seed": 3}).data[0].url
    fetched = httpx.get(url, timeout=30)  # presigned by the local S3 server's credentials
    assert fetched.status_code == 200
    image = Image.open(io.BytesIO(fetched.content))
    assert image.format == pil and image.size == (32, 32)


def test_edit_with_a_file_equals_in_process(client, clients):
    source = noise_image(24, 24, seed=9)  # the VAE resize makes it 512x512
    out = client.images.edit(model=MODEL, image=("in.png", png_bytes(source), "image/png"), prompt="make it blue",
                             extra_body={**FAST, "seed": 4})
    got = pixels(base64.b64decode(out.data[0].b64_json))
    want = wf.edit(clients, source, "make it blue", wf.edit_params(source, num_timesteps=3, seed=4))
    assert got.shape == (512, 512, 3) and np.array_equal(got, want.pixels)


def test_chat_with_an_image_streamed_equals_not_streamed_and_in_process(client, clients):
    image = noise_image(20, 20, seed=2)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what is in the picture?"},
                                         {"type": "image_url", "image_url": {"url": data_url(png_bytes(image))}}]}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=48)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens > 0
    assert whole.usage.prompt_tokens > 10  # the question and the image's tokens
    want = wf.understand(clients, image, "what is in the picture?", TextParams(max_new_tokens=48))
    assert text == want.text and whole.usage.completion_tokens == want.tokens
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=48, stream=True,
                                            stream_options={"include_usage": True})
    deltas, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(deltas) == text and finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_chunks_arrive_before_the_answer_ends(stack):
    """A long answer arrives in several content chunks, the first well before the last."""
    image = data_url(png_bytes(noise_image(16, 16, seed=5)))
    body = {"model": MODEL, "stream": True, "max_tokens": 400, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "tell me a long story about it"}, {"type": "image_url", "image_url": {"url": image}}]}]}
    arrivals = []
    with httpx.stream("POST", f"{stack.http.base_url}/v1/chat/completions", json=body, timeout=120,
                      headers={"authorization": f"Bearer {TOKEN}"}) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                arrivals.append(time.monotonic())
            if line == "data: [DONE]":
                break
    assert len(arrivals) >= 2 and arrivals[-1] - arrivals[0] > 0.05, lines[:5]


def test_chat_image_modality_returns_an_image(client, clients):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a green field"}],
                                         modalities=["image"], extra_body={**FAST, "size": "32x32", "seed": 8})
    part = out.choices[0].message.content[0]
    assert part["type"] == "image_url"
    got = pixels(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))
    want = wf.generate(clients, "a green field", ImageParams(width=32, height=32, num_timesteps=3, seed=8))
    assert np.array_equal(got, want.pixels)


def test_errors_are_the_sdks_exceptions(client, stack):
    with pytest.raises(openai.BadRequestError, match="width"):
        client.images.generate(model=MODEL, prompt="x", size="30x32")
    with pytest.raises(openai.BadRequestError, match="data URL"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="session_id"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"},
                                                              {"role": "assistant", "content": "b"},
                                                              {"role": "user", "content": "c"}])
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n"):
        client.images.generate(model=MODEL, prompt="x", n=9)
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.proc.http_port}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.post(f"{stack.http.base_url}/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_a_client_that_hangs_up_cancels_its_job(stack):
    def job_keys() -> set[bytes]:
        return {k for k in stack.jobs.r.scan_iter("bagel:job:*") if k.count(b":") == 2}  # not leases

    before = job_keys()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.http.base_url}/v1/images/generations", timeout=1.5,
                   headers={"authorization": f"Bearer {TOKEN}"},
                   json={"model": MODEL, "prompt": "slow", "size": "64x64", "num_inference_steps": 1000})
    (key,) = job_keys() - before
    job_id = key.decode().rsplit(":", 1)[1]
    deadline = time.monotonic() + 30
    while stack.jobs.get(job_id).state != jobs_pb2.JOB_STATE_CANCELLED:
        assert time.monotonic() < deadline, stack.jobs.get(job_id)
        time.sleep(0.1)


def test_hundreds_of_open_streams_cost_no_threads(stack, monkeypatch):
    """300 event streams on a job that stays queued: /healthz answers at once, idle streams get keep-alives."""
    monkeypatch.setattr(http_api, "KEEPALIVE_S", 0.5)
    job = stack.jobs.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="never sent")).job
    base, auth = str(stack.http.base_url), {"authorization": f"Bearer {TOKEN}"}

    async def main() -> tuple[float, list[bytes]]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, headers=auth, timeout=30, limits=limits) as c:
            opened = asyncio.Event()
            firsts: list[bytes] = []

            async def listen():
                async with c.stream("GET", f"/v1/jobs/{job.id}/events", params={"wait": 20}) as r:
                    seen = b""
                    async for piece in r.aiter_bytes():
                        seen += piece
                        if b": keep-alive" in seen:
                            firsts.append(seen)
                            if len(firsts) == 300:
                                opened.set()
                            return

            tasks = [asyncio.create_task(listen()) for _ in range(300)]
            await asyncio.wait_for(opened.wait(), 20)
            t = time.monotonic()
            health = await c.get("/healthz")
            took = time.monotonic() - t
            assert health.status_code == 200
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return took, firsts

    took, firsts = asyncio.run(main())
    assert took < 5.0  # a liveness probe's timeout, with 300 streams open
    assert all(b"event: job" in f and b": keep-alive" in f for f in firsts)
    stack.jobs.request_cancel(job.id)


def test_the_openapi_schema_lists_what_is_served(stack):
    schema = httpx.get(f"{stack.http.base_url}/openapi.json").json()
    paths = schema["paths"]
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/chat/completions", "/v1/models", "/v1/jobs",
            "/v1/jobs/{job_id}/events", "/healthz"} <= set(paths)
    chat = paths["/v1/chat/completions"]["post"]
    assert "messages" in json.dumps(chat["requestBody"]) or "ChatRequest" in json.dumps(chat["requestBody"])
    codes = {code for p in paths.values() for op in p.values() for code in op["responses"]}
    assert "422" not in codes and "400" in codes  # invalid requests are answered 400, never 422
    assert "multipart/form-data" in paths["/v1/images/edits"]["post"]["requestBody"]["content"]
    r = httpx.post(f"{stack.http.base_url}/v1/images/generations", headers={"authorization": f"Bearer {TOKEN}"},
                   json={"model": MODEL, "prompt": "x", "n": "many"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{stack.http.base_url}/docs").status_code == 200
