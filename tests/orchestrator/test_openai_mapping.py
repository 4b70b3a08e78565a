"""The OpenAI-compatible API's translation into jobs, without servers: request fields -> SubmitJobRequest,
messages -> prompt and image, the think / answer split of a stream, errors in OpenAI's shape."""

from __future__ import annotations

import base64

import pytest

from services.common.contracts import InputError, TooLarge
from services.common.protos import jobs_pb2, llm_pb2
from services.orchestrator.gateway import openai_api as oa
from services.orchestrator.gateway.openai_errors import is_openai_path, openai_error


def test_image_options_map_to_the_job_request():
    o = oa.ImageOptions(prompt="a cat", size="64x32", num_inference_steps=7, guidance_scale=5.5,
                        image_guidance_scale=1.5, cfg_interval=(0.1, 0.9), cfg_renorm_type="channel",
                        cfg_renorm_min=0.2, timestep_shift=2.0, think=True)
    req = oa._image_job(jobs_pb2.WORKFLOW_GENERATE, o)
    p = req.image_params
    assert (req.prompt, req.think, p.width, p.height, p.num_timesteps) == ("a cat", True, 64, 32, 7)
    assert (p.cfg_text_scale, p.cfg_img_scale, p.cfg_renorm_type) == (5.5, 1.5, llm_pb2.CFG_RENORM_TYPE_CHANNEL)
    assert p.cfg_interval_lo == pytest.approx(0.1) and p.cfg_interval_hi == pytest.approx(0.9)
    auto = oa._image_job(jobs_pb2.WORKFLOW_EDIT, oa.ImageOptions(prompt="x")).image_params
    assert not auto.HasField("width") and not auto.HasField("num_timesteps")  # the workflow's defaults
    with pytest.raises(InputError, match="size"):
        oa._image_job(jobs_pb2.WORKFLOW_GENERATE, oa.ImageOptions(prompt="x", size="big"))


def test_chat_maps_to_understand_generate_or_edit():
    png = b"\x89PNG fake bytes"
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    ask = oa.ChatRequest(model="m", max_tokens=9, temperature=0.7, top_p=0.9, seed=5, think=True,
                         messages=[{"role": "user", "content": [{"type": "text", "text": "what"},
                                                                {"type": "image_url", "image_url": {"url": url}}]}])
    req = oa._chat_job(ask)
    assert req.workflow == jobs_pb2.WORKFLOW_UNDERSTAND and (req.prompt, req.image, req.think) == ("what", png, True)
    t = req.text_params
    assert (t.max_new_tokens, t.do_sample, t.top_p, t.seed) == (9, True, pytest.approx(0.9), 5)
    greedy = oa._chat_job(oa.ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0))
    assert not greedy.text_params.do_sample and not greedy.text_params.HasField("max_new_tokens")
    draw = oa._chat_job(oa.ChatRequest(model="m", modalities=["image"], size="32x32", seed=3,
                                       messages=[{"role": "user", "content": "a field"}]))
    assert draw.workflow == jobs_pb2.WORKFLOW_GENERATE and draw.image_params.seed == 3
    edit = oa._chat_job(oa.ChatRequest(model="m", modalities=["image"], max_completion_tokens=4,
                                       messages=ask.messages))
    assert edit.workflow == jobs_pb2.WORKFLOW_EDIT and edit.image == png and edit.text_params.max_new_tokens == 4
    turn = oa._chat_job(oa.ChatRequest(model="m", session_id="c1", messages=[{"role": "user", "content": "and?"}]))
    assert turn.session_id == "c1" and not turn.image


@pytest.mark.parametrize("messages, match", [
    ([], "at least one"),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "session_id"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}], "data URL"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
     "base64"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "part"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,AA=="},
                                   {"type": "image_url", "image_url": "data:image/png;base64,AA=="}]}], "one image"),
])
def test_messages_refused_with_a_reason(messages, match):
    with pytest.raises(InputError, match=match):
        oa._read_messages(messages, in_session=False)


def test_an_oversized_data_url_is_too_large():
    huge = "data:image/png;base64," + "A" * (oa.MAX_IMAGE_BYTES * 4 // 3 + 8)
    with pytest.raises(TooLarge):
        oa._data_url(huge, "image")


def test_think_split_streams_reasoning_then_answer_and_ends_as_the_result():
    s = oa._ThinkSplit(think=True)
    out = []
    for text in ["<think>plan", "<think>planning </th", "<think>planning </think> ans", "<think>planning </think> answer \ufffd"]:
        out += s.update(text)
    out += s.finish("planning", "answer")
    reasoning = "".join(d.get("reasoning_content", "") for d in out)
    answer = "".join(d.get("content", "") for d in out)
    assert (reasoning, answer) == ("planning", "answer")
    assert out[0] == {"reasoning_content": "plan"}  # the partial tag and trailing space were held back
    plain = oa._ThinkSplit(think=False)
    chunks = plain.update(" Hello wor") + plain.update(" Hello world\ufffd") + plain.finish("", " Hello world!")
    assert "".join(d["content"] for d in chunks) == " Hello world!" and len(chunks) == 3


def test_openai_error_shape_and_paths():
    assert openai_error("INVALID_ARGUMENT", "bad", 400) == {"error": {
        "message": "bad", "type": "invalid_request_error", "param": None, "code": "invalid_argument"}}
    assert openai_error("UNAVAILABLE", "x", 503)["error"]["type"] == "server_error"
    assert is_openai_path("/v1/chat/completions") and is_openai_path("/v1/models")
    assert not is_openai_path("/v1/jobs")


def test_a_failed_job_answers_with_its_own_status():
    job = jobs_pb2.Job(id="j", state=jobs_pb2.JOB_STATE_FAILED,
                       error=jobs_pb2.JobError(code="RESOURCE_EXHAUSTED", message="kv cache full"))
    e = oa.JobFailed.of(job)
    assert (e.grpc_code, e.http_status, str(e)) == ("RESOURCE_EXHAUSTED", 429, "kv cache full")
