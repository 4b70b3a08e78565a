"""The ViT side, transport-free: preprocess images and encode several in one packed forward."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from services.common.checkpoint import Checkpoint
from services.common.config import BagelConfig
from services.attention import get_backend
from services.common.contracts import ViTImageItem
from services.common.images import vit_resize
from services.common.tensor_codec import to_tensor
from services.vit.model import SiglipVisionModel, load_vit, patchify_image, vit_position_ids


class ViTEngine:
    def __init__(self, model: SiglipVisionModel, cfg: BagelConfig, attention=None):
        self.model, self.cfg = model, cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.attention = attention or get_backend(device=self.device)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device="cpu", dtype=torch.float32, attention=None) -> "ViTEngine":
        return cls(load_vit(ckpt, dtype=dtype, device=device), ckpt.config, attention)

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image]) -> list[ViTImageItem]:
        """Each image -> SigLIP features [h*w, vit_hidden] (post_layernorm) with its patch grid."""
        if not images:
            return []
        patch, side = self.cfg.vit.patch_size, self.cfg.vit_max_num_patch_per_side
        pixels, positions, grids, lens = [], [], [], []
        for img in images:
            x = to_tensor(vit_resize(img))  # [3, H, W] in [-1, 1]
            h, w = x.shape[1] // patch, x.shape[2] // patch
            pixels.append(patchify_image(x, patch))  # [h*w, patch*patch*3]
            positions.append(vit_position_ids(h, w, side))
            grids.append((h, w))
            lens.append(h * w)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lens), 0)
        feats = self.model(torch.cat(pixels).to(self.device, self.dtype), torch.cat(positions).to(self.device),
                           cu.to(self.device), max(lens), attention=self.attention)
        return [ViTImageItem(f.float().cpu(), g) for f, g in zip(feats.split(lens), grids)]
