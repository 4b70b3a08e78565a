"""The one definition of each workflow: which steps run, in which order, on which service.

Written against three small client interfaces, so the same functions run in-process (tests, the
single-machine CLI) and distributed (the orchestrator's Celery tasks call gRPC clients with the same
methods). The LLM side builds the three CFG contexts itself from the ordered item list.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from services.common.images import vae_resize
from services.llm.engine import (ContextItem, Controls, ImageParams, ImageResult, TextItem, TextParams,
                                 UnderstandResult, VAEImageItem, ViTImageItem)


@dataclass(frozen=True)
class SessionRef:
    """A conversation kept by the LLM service between calls (multi-turn chat, iterative editing)."""

    id: str
    ttl_s: int = 0  # idle time before the service frees it; 0 = the service's default


class ViTClient(Protocol):
    def encode(self, images: Sequence[Image.Image]) -> list[ViTImageItem]: ...


class VAEClient(Protocol):
    def encode(self, image: Image.Image) -> VAEImageItem: ...

    def decode(self, latent: torch.Tensor) -> np.ndarray: ...


class LLMClient(Protocol):
    """`session` is taken by the gRPC client (the LLM service keeps sessions); the in-process engine takes
    its own Session objects instead, so the workflows pass it only when one is given."""

    def understand(self, items: Sequence[ContextItem], params: TextParams | None = None, think: bool = False,
                   controls: Controls | None = None, **session) -> UnderstandResult: ...

    def generate_image(self, items: Sequence[ContextItem], params: ImageParams, think: bool = False,
                       think_params: TextParams | None = None, controls: Controls | None = None,
                       **session) -> ImageResult: ...


@dataclass
class Clients:
    vit: ViTClient
    vae: VAEClient
    llm: LLMClient


@dataclass
class GeneratedImage:
    pixels: np.ndarray  # uint8 [H, W, 3]
    latent: torch.Tensor
    seed: int | None
    think: str | None

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.pixels)


def _session(session: SessionRef | None) -> dict:
    return {"session": session} if session is not None else {}


def understand(c: Clients, image: Image.Image | None, prompt: str, params: TextParams | None = None,
               think: bool = False, controls: Controls | None = None,
               session: SessionRef | None = None) -> UnderstandResult:
    """Without an image only as a follow-up in a session, which holds the earlier turns' images."""
    items: list[ContextItem] = []
    if image is not None:
        # The reference applies the VAE resize to every input image first, even for understanding.
        items += c.vit.encode([vae_resize(image)])
    return c.llm.understand([*items, TextItem(prompt)], params, think, controls, **_session(session))


def generate(c: Clients, prompt: str, params: ImageParams | None = None, think: bool = False,
             think_params: TextParams | None = None, controls: Controls | None = None,
             session: SessionRef | None = None) -> GeneratedImage:
    res = c.llm.generate_image([TextItem(prompt)], params or ImageParams(), think, think_params, controls,
                               **_session(session))
    return GeneratedImage(c.vae.decode(res.latent), res.latent, res.seed, res.think)


def edit_params(image: Image.Image, **overrides) -> ImageParams:
    """Editing defaults; the output size is the input's size after the VAE resize."""
    w, h = vae_resize(image).size
    return ImageParams.for_edit(w, h, **overrides)


def edit(c: Clients, image: Image.Image, prompt: str, params: ImageParams | None = None, think: bool = False,
         think_params: TextParams | None = None, controls: Controls | None = None,
         session: SessionRef | None = None) -> GeneratedImage:
    img = vae_resize(image)
    params = replace(params or edit_params(image), width=img.size[0], height=img.size[1])
    # The input image enters as a clean VAE block, then as a ViT block at the next position.
    items: list[ContextItem] = [c.vae.encode(img), *c.vit.encode([img]), TextItem(prompt)]
    res = c.llm.generate_image(items, params, think, think_params, controls, **_session(session))
    return GeneratedImage(c.vae.decode(res.latent), res.latent, res.seed, res.think)
