"""bagel.v1 LLM messages -> LLMEngine inputs, and engine progress -> events: the LLM server's side of the
wire. Parameter conversion every side shares is services/common/contracts/messages.py.

Nothing here touches the network or object storage; tensors that travel by reference are read by the
caller (the server's Payloads) and handed in as tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch

from services.common.config import BagelConfig
from services.common.contracts import (ContextItem, ImageParams, InputError, messages, partial_think_end, Progress,
                                       TextItem, THINK_END, VAEImageItem, ViTImageItem)
from services.common.protos import llm_pb2
from services.common.tensor_codec import expect

FLOATS = (torch.float32, torch.bfloat16, torch.float16)

THINK, ANSWER = llm_pb2.TEXT_STAGE_THINK, llm_pb2.TEXT_STAGE_ANSWER


# ---- requests: proto -> engine -------------------------------------------------------------------
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
            expect(latent, (cfg.latent_channels, None, None), FLOATS, f"{where}.image.vae", finite=True)
            out.append(VAEImageItem(latent.float()))  # [z, H/8, W/8]
        if image.HasField("vit"):
            feats, grid = read_features(image.vit, f"{where}.image.vit")
            expect(feats, (None, cfg.vit.hidden_size), FLOATS, f"{where}.image.vit", finite=True)
            out.append(ViTImageItem(feats.float(), grid))  # [h*w, vit_hidden]
    return out


def image_params(msg: llm_pb2.ImageParams, items: Sequence[ContextItem], cfg: BagelConfig,
                 noise: torch.Tensor | None = None) -> ImageParams:
    """The request's parameters (services/common/contracts/messages.py) with what only the server can know:
    the first input latent's size (EDIT's default output size) and the explicit noise tensor."""
    latents = [it.latent for it in items if isinstance(it, VAEImageItem)]
    size = (latents[0].shape[2] * cfg.ae.downsample, latents[0].shape[1] * cfg.ae.downsample) if latents else None
    p = messages.image_params(msg, cfg, size, has_input_image=bool(latents))
    if noise is not None:
        expect(noise, (None, cfg.patch_latent_dim), FLOATS, "params.noise", finite=True)
        p.noise = noise.float()  # [h*w, 64]
        p.validate(cfg)
    return p


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
                text = text[:len(text) - partial_think_end(text)]
        if len(text) <= len(sent) or not text.startswith(sent):
            return []  # nothing new, or the decoder rewrote earlier text: TextDone carries the truth
        self.sent[stage] = text
        return [llm_pb2.TextDelta(stage=stage, text=text[len(sent):], tokens=tokens, max_tokens=budget)]

