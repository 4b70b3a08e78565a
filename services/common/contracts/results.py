"""What the LLM side returns to a workflow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class UnderstandResult:
    text: str
    think: str | None = None
    tokens: int = 0


@dataclass
class ImageResult:
    # The generated latent [z_channels, H/8, W/8]: a tensor in-process; through the services, a handle to
    # the stored object that the VAE service decodes without the worker ever reading it.
    latent: Any
    seed: int | None
    think: str | None = None
