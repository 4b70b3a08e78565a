"""bagel.v1 LLM messages <-> LLMEngine types, both ways: the server reads requests and writes events
with these, and the gRPC clients of services/orchestrator/remote.py write requests and read events.

Nothing here touches the network or object storage; tensors that travel by reference are read by the
caller (the server's Payloads) and handed in as tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch

from services.common.config import BagelConfig
from services.common.protos import common_pb2, llm_pb2
from services.common.tensor_codec import RAW, expect, tensor_to_message
from services.llm.engine import (THINK_END, ContextItem, ImageParams, InputError, Progress, TextItem, TextParams,
                                 VAEImageItem, ViTImageItem)

FLOATS = (torch.float32, torch.bfloat16, torch.float16)

RENORM_NAMES = {llm_pb2.CFG_RENORM_TYPE_GLOBAL: "global", llm_pb2.CFG_RENORM_TYPE_CHANNEL: "channel",
                llm_pb2.CFG_RENORM_TYPE_TEXT_CHANNEL: "text_channel"}
RENORM_ENUMS = {name: value for value, name in RENORM_NAMES.items()}
THINK, ANSWER = llm_pb2.TEXT_STAGE_THINK, llm_pb2.TEXT_STAGE_ANSWER


# ---- requests: proto -> engine -------------------------------------------------------------------
def text_params(msg: llm_pb2.TextParams, default_tokens: int) -> TextParams:
    """Unset fields take the proto's defaults; out-of-range values raise InputError."""
    p = TextParams(max_new_tokens=default_tokens)
    for name in ("max_new_tokens", "do_sample", "temperature", "top_p", "seed"):
        if msg.HasField(name):
            setattr(p, name, getattr(msg, name))
    p.validate()
    return p


def context_items(msgs: Sequence[llm_pb2.ContextItem], cfg: BagelConfig, read_features, read_latent,
                  max_images: int) -> list[ContextItem]:
    """The ordered context. An image with both views becomes a VAE item, then a ViT item (the reference's
    edit order). read_features(msg, where) -> (features, grid); read_latent(msg, where) -> tensor."""
    if not msgs:
        raise InputError("items: at least one context item is needed")
    images = sum(m.WhichOneof("item") == "image" for m in msgs)
    if images > max_images:
        raise InputError(f"items: {images} images given; this server takes at most {max_images} per request")
    out: list[ContextItem] = []
    for i, m in enumerate(msgs):
        where = f"items[{i}]"
        kind = m.WhichOneof("item")
        if kind == "text":
            out.append(TextItem(m.text))
            continue
        if kind != "image":
            raise InputError(f"{where}: empty item (set `text` or `image`)")
        image = m.image
        if not image.HasField("vae") and not image.HasField("vit"):
            raise InputError(f"{where}.image: set `vit` (to ask about it) and/or `vae` (to edit it)")
        if image.HasField("vae"):
            latent = read_latent(image.vae, f"{where}.image.vae")
            expect(latent, (cfg.latent_channels, None, None), FLOATS, f"{where}.image.vae")
            out.append(VAEImageItem(latent.float()))  # [z, H/8, W/8]
        if image.HasField("vit"):
            feats, grid = read_features(image.vit, f"{where}.image.vit")
            expect(feats, (None, cfg.vit.hidden_size), FLOATS, f"{where}.image.vit")
            out.append(ViTImageItem(feats.float(), grid))  # [h*w, vit_hidden]
    return out


def image_params(msg: llm_pb2.ImageParams, items: Sequence[ContextItem], cfg: BagelConfig,
                 noise: torch.Tensor | None = None) -> ImageParams:
    """The preset's defaults (UNSPECIFIED: EDIT when an item holds a VAE latent) with the set fields over
    them. EDIT's default size is the first input latent's (1024x1024 when there is none)."""
    preset = msg.preset
    latents = [it.latent for it in items if isinstance(it, VAEImageItem)]
    if preset == llm_pb2.IMAGE_PRESET_UNSPECIFIED:
        preset = llm_pb2.IMAGE_PRESET_EDIT if latents else llm_pb2.IMAGE_PRESET_GENERATE
    if preset == llm_pb2.IMAGE_PRESET_EDIT:
        down = cfg.ae.downsample
        w, h = (latents[0].shape[2] * down, latents[0].shape[1] * down) if latents else (1024, 1024)
        p = ImageParams.for_edit(w, h)
    elif preset == llm_pb2.IMAGE_PRESET_GENERATE:
        p = ImageParams()
    else:
        raise InputError(f"params.preset: unknown value {preset}")
    for name in ("width", "height", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_min", "timestep_shift",
                 "num_timesteps", "seed"):
        if msg.HasField(name):
            setattr(p, name, getattr(msg, name))
    lo = msg.cfg_interval_lo if msg.HasField("cfg_interval_lo") else p.cfg_interval[0]
    hi = msg.cfg_interval_hi if msg.HasField("cfg_interval_hi") else p.cfg_interval[1]
    p.cfg_interval = (lo, hi)
    if msg.cfg_renorm_type != llm_pb2.CFG_RENORM_TYPE_UNSPECIFIED:
        if msg.cfg_renorm_type not in RENORM_NAMES:
            raise InputError(f"params.cfg_renorm_type: unknown value {msg.cfg_renorm_type}")
        p.cfg_renorm_type = RENORM_NAMES[msg.cfg_renorm_type]
    if noise is not None:
        expect(noise, (None, cfg.patch_latent_dim), FLOATS, "params.noise")
        p.noise = noise.float()  # [h*w, 64]
    p.validate(cfg)
    return p


# ---- requests: engine -> proto (clients) ---------------------------------------------------------
def text_params_message(p: TextParams | None) -> llm_pb2.TextParams | None:
    if p is None:
        return None
    msg = llm_pb2.TextParams(max_new_tokens=p.max_new_tokens, do_sample=p.do_sample, temperature=p.temperature,
                             top_p=p.top_p)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def image_params_message(p: ImageParams, encoding: int = RAW) -> llm_pb2.ImageParams:
    """Every field set explicitly, so the server's preset defaults never apply: the run is the one asked for."""
    msg = llm_pb2.ImageParams(
        preset=llm_pb2.IMAGE_PRESET_GENERATE, width=p.width, height=p.height, cfg_text_scale=p.cfg_text_scale,
        cfg_img_scale=p.cfg_img_scale, cfg_interval_lo=p.cfg_interval[0], cfg_interval_hi=p.cfg_interval[1],
        cfg_renorm_min=p.cfg_renorm_min, cfg_renorm_type=RENORM_ENUMS.get(p.cfg_renorm_type, 0),
        timestep_shift=p.timestep_shift, num_timesteps=p.num_timesteps)
    if p.seed is not None:
        msg.seed = p.seed
    if p.noise is not None:
        msg.noise.inline.CopyFrom(tensor_to_message(p.noise.float(), encoding))
    return msg


def item_message(item: ContextItem, *, down: int, encoding: int = RAW) -> llm_pb2.ContextItem:
    """An engine item with its tensor inline (clients holding a stored object's key pass that instead);
    down is the VAE's downsample (cfg.ae.downsample), which sizes a latent's image."""
    if isinstance(item, TextItem):
        return llm_pb2.ContextItem(text=item.text)
    if isinstance(item, ViTImageItem):
        h, w = item.grid
        vit = common_pb2.ViTFeatures(inline=tensor_to_message(item.features, encoding),
                                     grid=common_pb2.PatchGrid(rows=h, cols=w))
        return llm_pb2.ContextItem(image=llm_pb2.ImageItem(vit=vit))
    if isinstance(item, VAEImageItem):
        latent = latent_message(item.latent, down=down, encoding=encoding)
        return llm_pb2.ContextItem(image=llm_pb2.ImageItem(vae=latent))
    raise TypeError(f"unknown context item {type(item).__name__}")


def latent_message(latent: torch.Tensor, *, down: int, encoding: int = RAW) -> common_pb2.Latent:
    return common_pb2.Latent(inline=tensor_to_message(latent, encoding), size=latent_size(latent, down))


def latent_size(latent: torch.Tensor, down: int) -> common_pb2.ImageSize:
    """The image size of a latent [z, h, w]. down (cfg.ae.downsample) has no default: it is the
    checkpoint's, not a constant."""
    return common_pb2.ImageSize(width=latent.shape[2] * down, height=latent.shape[1] * down)


# ---- events: engine progress -> proto ------------------------------------------------------------
class TextDeltas:
    """Progress reports (the whole decoded text so far) -> TextDeltas carrying only the new text.

    With split_think, text before `</think>` is THINK and after it ANSWER (the tag itself is not sent);
    otherwise everything is `stage`. Text that may still change is held back: a trailing U+FFFD (a
    character whose bytes are not all decoded yet) and a trailing prefix of `</think>`. finish()
    sends what is left. Until `</think>` appears, text is THINK: if it never does, the engine calls it
    all the answer, and TextDone (always authoritative) says so.
    """

    def __init__(self, stage: int = ANSWER, split_think: bool = False):
        self.stage, self.split = stage, split_think
        self.sent = {THINK: "", ANSWER: ""}
        self.think_tokens: int | None = None  # tokens decoded when `</think>` appeared
        self.last: Progress | None = None

    def update(self, p: Progress, final: bool = False) -> list[llm_pb2.TextDelta]:
        self.last = p
        if not self.split:
            return self._emit(self.stage, p.text, p.step, p.total, final)
        head, tag, tail = p.text.partition(THINK_END)
        if not tag:
            return self._emit(THINK, head, p.step, p.total, final)
        if self.think_tokens is None:
            self.think_tokens = p.step
        out = self._emit(THINK, head, self.think_tokens, p.total, final=True)
        return out + self._emit(ANSWER, tail, p.step - self.think_tokens, p.total - self.think_tokens, final)

    def finish(self) -> list[llm_pb2.TextDelta]:
        return self.update(self.last, final=True) if self.last is not None else []

    def _emit(self, stage: int, text: str, tokens: int, budget: int, final: bool) -> list[llm_pb2.TextDelta]:
        sent = self.sent[stage]
        if not final:
            text = text.rstrip("\ufffd")
            if stage == THINK and self.split:
                text = text[:len(text) - _partial_tag(text)]
        if len(text) <= len(sent) or not text.startswith(sent):
            return []  # nothing new, or the decoder rewrote earlier text: TextDone carries the truth
        self.sent[stage] = text
        return [llm_pb2.TextDelta(stage=stage, text=text[len(sent):], tokens=tokens, max_tokens=budget)]


def _partial_tag(text: str) -> int:
    """Length of the longest proper prefix of `</think>` that `text` ends with."""
    for n in range(len(THINK_END) - 1, 0, -1):
        if text.endswith(THINK_END[:n]):
            return n
    return 0
