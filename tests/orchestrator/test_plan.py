"""services/orchestrator/plan.py: what the gateway refuses before accepting a job, and the workflow
arguments the worker plans from a stored request. Pure functions, no servers."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace

import pytest
from PIL import Image

from services.common.contracts import MAX_SESSION_TTL_S, ImageParams, InputError, SessionRef, TextParams
from services.common.images import MAX_IMAGE_PIXELS, ImageError, image_size
from services.common.protos import jobs_pb2, llm_pb2
from services.orchestrator.gateway.operations import Gateway
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.plan import (DEFAULT_CONFIG, MAX_DEADLINE_S, MAX_IDEMPOTENCY_KEY, MAX_PROMPT_CHARS,
                                        check_context, check_request, plan_job)

UNDERSTAND, GENERATE, EDIT = jobs_pb2.WORKFLOW_UNDERSTAND, jobs_pb2.WORKFLOW_GENERATE, jobs_pb2.WORKFLOW_EDIT


def png(w: int = 128, h: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 90)).save(buf, "PNG")
    return buf.getvalue()


def request(workflow=GENERATE, prompt="a red fox in the snow", **fields) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(workflow=workflow, prompt=prompt, **fields)


# ---- check_request refusals --------------------------------------------------------------------------
REFUSED = {
    "unspecified workflow": (dict(workflow=jobs_pb2.WORKFLOW_UNSPECIFIED), "choose understand, generate or edit"),
    "unknown workflow": (dict(workflow=99), "choose understand, generate or edit"),
    "empty prompt": (dict(prompt=""), "must not be empty"),
    "blank prompt": (dict(prompt="  \n\t "), "must not be empty"),
    "too long prompt": (dict(prompt="x" * (MAX_PROMPT_CHARS + 1)), "the limit is"),
    "understand without image": (dict(workflow=UNDERSTAND), "needs an input image"),
    "edit without image": (dict(workflow=EDIT), "needs an input image"),
    "edit in a session without image": (dict(workflow=EDIT, session_id="s1"), "needs an input image"),
    "generate with image": (dict(image=png()), "generate takes no input image"),
    "generate with image_key": (dict(image_key="inputs/a.png"), "generate takes no input image"),
    "image and image_key": (dict(workflow=EDIT, image=png(), image_key="inputs/a.png"), "not both"),
    "image_params on understand": (dict(workflow=UNDERSTAND, image=png(),
                                        image_params=llm_pb2.ImageParams(num_timesteps=10)), "use text_params"),
    "deadline too long": (dict(deadline_seconds=MAX_DEADLINE_S + 1), "deadline_seconds"),
    "session id too long": (dict(session_id="s" * 257), "session_id"),
    "session id not printable": (dict(session_id="a\nb"), "session_id"),
    "ttl without session": (dict(session_ttl_seconds=60), "set session_id too"),
    "ttl over the LLM's maximum": (dict(session_id="s1", session_ttl_seconds=MAX_SESSION_TTL_S + 1),
                                   "session_ttl_seconds: at most 86400"),
    "idempotency key too long": (dict(idempotency_key="k" * (MAX_IDEMPOTENCY_KEY + 1)), "idempotency_key"),
    "idempotency key not printable": (dict(idempotency_key="a\x00b"), "idempotency_key"),
    "image_key not a key": (dict(workflow=EDIT, image_key="../etc/passwd"), "object key"),
    "image_key too long": (dict(workflow=EDIT, image_key="k" * 513), "object key"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_check_request_refuses(case):
    fields, match = REFUSED[case]
    with pytest.raises(InputError, match=match):
        check_request(request(**fields))


@pytest.mark.parametrize("req", [
    request(),
    request(workflow=UNDERSTAND, image=png()),
    request(workflow=UNDERSTAND, image_key="inputs/a.png"),
    request(workflow=UNDERSTAND, session_id="chat-1", session_ttl_seconds=60),  # a follow-up question
    request(workflow=EDIT, image=png(), deadline_seconds=MAX_DEADLINE_S),
    request(prompt="x" * MAX_PROMPT_CHARS, session_id="s" * 256, session_ttl_seconds=MAX_SESSION_TTL_S,
            idempotency_key="k" * MAX_IDEMPOTENCY_KEY),
], ids=["generate", "understand", "understand by key", "follow-up", "edit at max deadline", "at the limits"])
def test_check_request_accepts(req):
    check_request(req)  # raises nothing


# ---- plan_job ----------------------------------------------------------------------------------------
def test_generate_takes_the_reference_defaults():
    plan = plan_job(request(), None)
    assert (plan.workflow, plan.prompt, plan.image, plan.think, plan.session) == (
        "generate", "a red fox in the snow", None, False, None)
    assert plan.text_params is None
    p = plan.image_params
    assert (p.width, p.height, p.cfg_text_scale, p.cfg_img_scale, p.cfg_interval, p.timestep_shift,
            p.num_timesteps, p.cfg_renorm_type, p.cfg_renorm_min, p.seed) == (
        1024, 1024, 4.0, 1.0, (0.4, 1.0), 3.0, 50, "global", 0.0, None)
    assert p == ImageParams()


def test_generate_keeps_the_fields_it_was_given():
    msg = llm_pb2.ImageParams(width=512, height=256, num_timesteps=20, seed=7, cfg_interval_hi=0.75)  # float32-exact
    p = plan_job(request(image_params=msg), None).image_params
    assert (p.width, p.height, p.num_timesteps, p.seed, p.cfg_interval, p.cfg_text_scale) == (
        512, 256, 20, 7, (0.4, 0.75), 4.0)


def test_edit_takes_the_edit_defaults_at_the_vae_resized_input_size():
    plan = plan_job(request(workflow=EDIT, image=png(128, 96)), png(128, 96))
    assert plan.workflow == "edit" and plan.image.size == (128, 96)
    p = plan.image_params
    # 128x96 after the VAE resize: short side 512, multiples of 16
    assert (p.width, p.height) == (688, 512)
    assert (p.cfg_text_scale, p.cfg_img_scale, p.cfg_interval, p.cfg_renorm_type) == (4.0, 2.0, (0.0, 1.0),
                                                                                      "text_channel")
    assert p == ImageParams.for_edit(688, 512)


def test_edit_accepts_its_own_size_and_refuses_another():
    same = llm_pb2.ImageParams(width=688, height=512)
    assert plan_job(request(workflow=EDIT, image=png(), image_params=same), png()).image_params.width == 688
    for field, value in (("width", 512), ("height", 688)):
        msg = llm_pb2.ImageParams(**{field: value})
        with pytest.raises(InputError, match=f"image_params.{field}"):
            plan_job(request(workflow=EDIT, image=png(), image_params=msg), png())


def test_an_explicit_generate_preset_on_edit_still_sizes_the_output_from_the_input():
    msg = llm_pb2.ImageParams(preset=llm_pb2.IMAGE_PRESET_GENERATE)
    p = plan_job(request(workflow=EDIT, image=png(), image_params=msg), png()).image_params
    assert (p.width, p.height, p.cfg_img_scale, p.cfg_interval) == (688, 512, 1.0, (0.4, 1.0))


def test_think_plans_with_the_think_budget():
    plan = plan_job(request(think=True), None)
    assert plan.think and plan.text_params == TextParams(max_new_tokens=1000)
    plan = plan_job(request(think=True, text_params=llm_pb2.TextParams(max_new_tokens=64, seed=3)), None)
    assert (plan.text_params.max_new_tokens, plan.text_params.seed) == (64, 3)


def test_understand_budgets_512_tokens_or_1000_when_thinking():
    plan = plan_job(request(workflow=UNDERSTAND, image=png()), png())
    assert plan.workflow == "understand" and plan.image_params is None and not plan.think
    assert plan.text_params == TextParams(max_new_tokens=512)
    plan = plan_job(request(workflow=UNDERSTAND, image=png(), think=True), png())
    assert plan.think and plan.text_params.max_new_tokens == 1000


def test_noise_is_refused():
    msg = llm_pb2.ImageParams()
    msg.noise.ref.key = "noise/0.safetensors"
    with pytest.raises(InputError, match="image_params.noise"):
        plan_job(request(image_params=msg), None)


def test_bad_values_are_refused_with_the_field_name():
    with pytest.raises(InputError, match="num_timesteps"):
        plan_job(request(image_params=llm_pb2.ImageParams(num_timesteps=1)), None)
    with pytest.raises(InputError, match="width"):
        plan_job(request(image_params=llm_pb2.ImageParams(width=1000)), None)  # not a multiple of 16
    with pytest.raises(InputError, match="max_new_tokens"):
        plan_job(request(workflow=UNDERSTAND, image=png(), text_params=llm_pb2.TextParams(max_new_tokens=0)), png())


def test_a_session_becomes_a_session_ref():
    plan = plan_job(request(workflow=UNDERSTAND, session_id="chat-1", session_ttl_seconds=90), None)
    assert plan.session == SessionRef("chat-1", 90) and plan.image is None
    assert plan_job(request(session_id="gen-1"), None).session == SessionRef("gen-1", 0)


# ---- check_context -----------------------------------------------------------------------------------
def test_check_context_refuses_a_prompt_longer_than_the_models_context():
    small = replace(DEFAULT_CONFIG, llm=replace(DEFAULT_CONFIG.llm, max_position_embeddings=64))
    check_context(request(prompt="hello"), None, small)  # fits
    with pytest.raises(InputError, match="limit is 64"):
        check_context(request(prompt="hello " * 100), None, small)
    # the image's tokens count too: a short prompt with an edit input no longer fits
    with pytest.raises(InputError, match="context tokens"):
        check_context(request(workflow=EDIT, prompt="hello", image=png()), (688, 512), small)


def test_plan_job_refuses_a_prompt_the_default_model_cannot_hold():
    # under the character limit, over the 32768-token context: every CJK character is a token or more
    prompt = "".join(chr(0x4E00 + i % 20000) for i in range(MAX_PROMPT_CHARS - 1))
    with pytest.raises(InputError, match="context tokens"):
        plan_job(request(prompt=prompt), None)


# ---- the gateway plans from the image header ---------------------------------------------------------
@pytest.mark.parametrize("size", [(128, 96), (3000, 700), (50, 2000), (1024, 1024)])
@pytest.mark.parametrize("workflow", [UNDERSTAND, EDIT])
def test_planning_from_the_header_equals_planning_from_the_pixels(size, workflow):
    data = png(*size)
    decoded = plan_job(request(workflow=workflow, image=data), data)
    header = plan_job(request(workflow=workflow, image=data), data, decode=False)
    assert decoded.image.size == size and header.image is None
    assert header.context_tokens == decoded.context_tokens
    assert header.image_params == decoded.image_params


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> bytes:
    """8000x8000 (61 megapixels, under the 64 MP cap) in a few KB: a bilevel image costs 8 MB to make."""
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 100_000
    return buf.getvalue()


def test_a_huge_image_is_planned_from_its_header(huge_png):
    assert image_size(huge_png) == (8000, 8000)
    plan = plan_job(request(workflow=EDIT, image=huge_png), huge_png, decode=False)
    assert plan.image is None and (plan.image_params.width, plan.image_params.height) == (1024, 1024)
    # 1024x1024 after the VAE resize: 64x64 latent tokens, and the ViT's 980x980 (70x70 patches), each
    # between two markers, after the prompt's own tokens
    prompt_tokens = plan_job(request(), None).context_tokens
    assert plan.context_tokens == prompt_tokens + (70 * 70 + 2) + (64 * 64 + 2)
    small = replace(DEFAULT_CONFIG, llm=replace(DEFAULT_CONFIG.llm, max_position_embeddings=plan.context_tokens - 1))
    with pytest.raises(InputError, match="context tokens"):
        plan_job(request(workflow=EDIT, image=huge_png), huge_png, small, decode=False)


RSS_PROBE = """
import resource, sys
from services.common.protos import jobs_pb2
from services.orchestrator.plan import plan_job
data = open(sys.argv[1], "rb").read()
plan_job(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="x"), None)  # load the tokenizer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
plan_job(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_EDIT, prompt="x", image=data), data, decode=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_planning_a_huge_image_at_the_gateway_decodes_no_pixels(huge_png, tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png)
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path)], capture_output=True, text=True,
                         timeout=300, check=True)
    grew_mib = int(out.stdout.split()[-1])
    assert grew_mib < 150, f"planning grew the peak RSS by {grew_mib} MiB (decoded RGB would be 183 MiB)"


def test_the_header_check_still_refuses_what_is_not_an_image_or_too_large():
    for data, match in ((b"not an image", "cannot decode"), (b"\x89PNG broken", "cannot decode"), (b"", "empty")):
        with pytest.raises(ImageError, match=match):
            plan_job(request(workflow=EDIT, image=data or b"x"), data, decode=False)
    buf = io.BytesIO()
    Image.new("1", (9000, 8000)).save(buf, "PNG")  # 72 MP
    with pytest.raises(ImageError, match=f"the limit is {MAX_IMAGE_PIXELS}"):
        image_size(buf.getvalue())


class _UnreadableStore:
    def get_bytes(self, key, max_bytes=None):
        raise AssertionError(f"the gateway read {key} for a request it should have refused")


def test_the_gateway_checks_the_request_before_reading_its_image_key():
    g = Gateway(jobs=None, store=_UnreadableStore(), celery=None, settings=OrchestratorSettings(), reader=object())
    req = request(workflow=EDIT, image=png(), image_key="uploads/missing.png")
    with pytest.raises(InputError, match="not both"):
        g._submit(req, "job-1")
