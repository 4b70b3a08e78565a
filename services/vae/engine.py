"""The VAE side, transport-free: image -> scaled latent, latent -> uint8 pixels."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from services.common.checkpoint import Checkpoint
from services.common.contracts import VAEImageItem
from services.common.images import ImageError
from services.common.tensor_codec import to_tensor
from services.vae.model import AutoEncoder, load_ae, to_uint8_image


SIDE_MULTIPLE = 16  # the VAE's 8x downsample, then the LLM's 2x2 latent patches


def check_image_size(width: int, height: int, max_side: int | None = None) -> None:
    """Refuse a size the VAE cannot encode as is (ImageError: INVALID_ARGUMENT on a server). The engine
    checks the sides; a server also bounds them, before it waits for the model."""
    if width % SIDE_MULTIPLE or height % SIDE_MULTIPLE or (max_side is not None and max(width, height) > max_side):
        bound = f" and at most {max_side}" if max_side is not None else ""
        raise ImageError(f"VAE input sides must be multiples of {SIDE_MULTIPLE}{bound} (the official VAE resize "
                         f"gives such a size), got {width}x{height}")


class VAEEngine:
    def __init__(self, model: AutoEncoder):
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device="cpu", dtype=torch.float32) -> "VAEEngine":
        return cls(load_ae(ckpt, dtype=dtype, device=device))

    @torch.inference_mode()
    def encode(self, image: Image.Image, sample: bool = False, generator: torch.Generator | None = None) -> VAEImageItem:
        """An image already at its VAE size (sides multiples of 16) -> latent [z, H/8, W/8].

        The posterior mean by default (deterministic); `sample=True` draws from it as the reference does.
        """
        check_image_size(*image.size)
        x = to_tensor(image)[None].to(self.device, self.dtype)  # [1, 3, H, W]
        return VAEImageItem(self.model.encode(x, sample=sample, generator=generator)[0].float().cpu())

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """latent [z, H/8, W/8] -> uint8 [H, W, 3] (truncated, as the reference converts)."""
        x = self.model.decode(latent[None].to(self.device, self.dtype))[0]
        return to_uint8_image(x.float().cpu())
