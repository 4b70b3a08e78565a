"""SigLIP NaViT vision encoder as BAGEL runs it: several images of any size packed into one sequence.

Module names reproduce the checkpoint's keys under `vit_model.vision_model.` (the loader strips that
prefix). Differences from stock SigLIP, all from the BAGEL checkpoint: the patch embedding is a Linear
over flattened patches (the published conv weight, permuted), the position table is indexed by
`r * max_patches_per_side + c` so any aspect ratio works, only `num_layers_used` layers exist, and
attention is bidirectional within each image and never across images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.common.checkpoint import Checkpoint
from services.common.config import ViTConfig
from services.attention import SDPABackend


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig, max_patches_per_side: int):
        super().__init__()
        # Linear over a patch flattened in (row-in-patch, col-in-patch, channel) order, see `patchify_image`.
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.position_embedding = nn.Embedding(max_patches_per_side**2, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(pixels) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, attention) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # [tokens, heads, head_dim]
        k = self.k_proj(x).view(t, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_heads, self.head_dim)
        o = attention.varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.scale)
        return self.out_proj(o.reshape(t, self.num_heads * self.head_dim))  # [tokens, hidden]


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # gelu_pytorch_tanh in the published config.
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, attention) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens, max_seqlen, attention)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        # Only the layers inference runs: the checkpoint has no weights for the dropped last layer.
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_layers_used))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, attention) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen, attention)
        return x


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: ViTConfig, max_patches_per_side: int):
        super().__init__()
        self.cfg = cfg
        self.max_patches_per_side = max_patches_per_side
        self.embeddings = SiglipEmbeddings(cfg, max_patches_per_side)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, packed_pixel_values: torch.Tensor, packed_position_ids: torch.Tensor,
                cu_seqlens: torch.Tensor, max_seqlen: int, attention=None) -> torch.Tensor:
        """packed_pixel_values [T, patch_dim] (images concatenated), packed_position_ids [T] long,
        cu_seqlens [n_images + 1] int32 token offsets of each image. Returns [T, hidden]."""
        attention = attention if attention is not None else SDPABackend()
        x = self.embeddings(packed_pixel_values, packed_position_ids)
        x = self.encoder(x, cu_seqlens, max_seqlen, attention)
        return self.post_layernorm(x)


def patchify_image(img: torch.Tensor, patch: int) -> torch.Tensor:
    """[3, H, W] -> [(H/p)*(W/p), p*p*3]: patches row-major, each flattened in (row, col, channel) order."""
    c, hh, ww = img.shape
    h, w = hh // patch, ww // patch
    x = img.reshape(c, h, patch, w, patch)  # [c, rows, p, cols, q]
    x = torch.einsum("chpwq->hwpqc", x)  # [rows, cols, p, q, c]
    return x.reshape(h * w, patch * patch * c)


def vit_position_ids(h_patches: int, w_patches: int, max_per_side: int) -> torch.Tensor:
    """Row-major ids `r * max_per_side + c` into the position table (fixed width, any aspect ratio)."""
    rows = torch.arange(h_patches, dtype=torch.long)
    cols = torch.arange(w_patches, dtype=torch.long)
    return (rows[:, None] * max_per_side + cols[None, :]).flatten()


def load_vit(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device="cpu") -> SiglipVisionModel:
    """The vision tower of a checkpoint, built on the meta device and given its weights."""
    with torch.device("meta"):
        model = SiglipVisionModel(ckpt.config.vit, ckpt.config.vit_max_num_patch_per_side)
    return ckpt.load_weights(model, "vit", dtype, device)
