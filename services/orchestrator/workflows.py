"""The one definition of each workflow: which steps run, in which order, on which service.

Written against three small client interfaces, so the same functions run in-process (tests, the
single-machine CLI) and distributed (the orchestrator's Celery tasks call gRPC clients with the same
methods). The LLM side builds the three CFG contexts itself from the ordered item list.

The workflows never look inside a tensor: features and latents go from one client to the next as the
clients return them (tensors in-process; stored objects' handles through the services), so this module
runs in the torch-free worker as it does in-process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from services.common.contracts import (ContextItem, Controls, ImageParams, ImageResult, SessionRef, TextItem,
                                       TextParams, UnderstandResult, VAEImageItem, ViTImageItem)
from services.common.images import vae_resize


class ViTClient(Protocol):
    def encode(self, images: Sequence[Image.Image]) -> list[ViTImageItem]: ...


class VAEClient(Protocol):
    def encode(self, image: Image.Image) -> VAEImageItem: ...

    def decode(self, latent: Any) -> np.ndarray: ...  # the LLM client's ImageResult.latent


class LLMClient(Protocol):
    """The in-process engine (services/llm/sessions.py InProcessLLM) and the gRPC client take the same
    `session`: a SessionRef naming the conversation the request continues."""

    def understand(self, items: Sequence[ContextItem], params: TextParams | None = None, think: bool = False,
                   controls: Controls | None = None, session: SessionRef | None = None) -> UnderstandResult: ...

    def generate_image(self, items: Sequence[ContextItem], params: ImageParams, think: bool = False,
                       think_params: TextParams | None = None, controls: Controls | None = None,
                       session: SessionRef | None = None) -> ImageResult: ...


@dataclass
class Clients:
    vit: ViTClient
    vae: VAEClient
    llm: LLMClient


@dataclass
class GeneratedImage:
    pixels: np.ndarray  # uint8 [H, W, 3]
    latent: Any         # as the LLM client returned it (a tensor in-process)
    seed: int | None
    think: str | None

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.pixels)


def understand(c: Clients, image: Image.Image | None, prompt: str, params: TextParams | None = None,
               think: bool = False, controls: Controls | None = None,
               session: SessionRef | None = None) -> UnderstandResult:
    """Without an image only as a follow-up in a session, which holds the earlier turns' images."""
    items: list[ContextItem] = []
    if image is not None:
        # The reference applies the VAE resize to every input image first, even for understanding.
        items += c.vit.encode([vae_resize(image)])
    return c.llm.understand([*items, TextItem(prompt)], params, think, controls, session=session)


def generate(c: Clients, prompt: str, params: ImageParams | None = None, think: bool = False,
             think_params: TextParams | None = None, controls: Controls | None = None,
             session: SessionRef | None = None) -> GeneratedImage:
    res = c.llm.generate_image([TextItem(prompt)], params or ImageParams(), think, think_params, controls,
                               session=session)
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
    res = c.llm.generate_image(items, params, think, think_params, controls, session=session)
    return GeneratedImage(c.vae.decode(res.latent), res.latent, res.seed, res.think)
