"""The FLUX autoencoder BAGEL uses for generation.

Module and attribute names reproduce the key names of the published `ae.safetensors` exactly
(`encoder.down.0.block.1.conv1.weight`, `decoder.up.3.upsample.conv.bias`, ...), so the file loads
with `load_state_dict(strict=True)` and no renaming. The FLUX AE has no attention inside the
resolution levels, only in `mid`, so the per-level `attn` lists of the original code hold nothing
and are left out (they own no parameters, so the key names are unchanged).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.common.checkpoint import Checkpoint
from services.common.config import AEConfig


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        # A 1x1 projection only where the residual has to change width.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions; q/k/v/proj_out are 1x1 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [b, 1, h*w, c]: one head whose sequence is the pixel grid in row-major order.
        # contiguous: torch's CPU flash kernel instead of the much slower math path
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(2, 3).contiguous() for m in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # default scale c**-0.5, as in FLUX
        o = o.transpose(2, 3).reshape(b, c, h, w)  # [b, c, h, w]
        return x + self.proj_out(o)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric zero padding (right and bottom only), then a stride-2 conv: halves H and W exactly.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level; a plain container so the keys read `down.{i}.block.{j}...`."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, resample_name, resample)


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            block_out = ch * m
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            # Every level but the last halves the resolution: 2**(levels-1) = 8 overall.
            last = i == len(mult) - 1
            self.down.append(_Level(blocks, None if last else Downsample(block_in), "downsample"))
        self.mid = _Mid(block_in)
        self.norm_out = group_norm(block_in)
        # Mean and log-variance of the posterior, stacked on channels.
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, stride=1, padding=1)
        self.mid = _Mid(block_in)
        # Built from the lowest resolution up but stored so that up.0 is the highest resolution,
        # matching FLUX's indexing (and therefore its key names).
        levels: list[_Level] = []
        for i in reversed(range(len(mult))):
            block_out = ch * mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            levels.insert(0, _Level(blocks, Upsample(block_in) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX AE. Accepts a single image [3, H, W] / latent [C, h, w] or a batch of them."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.scale_factor = cfg.scale_factor
        self.shift_factor = cfg.shift_factor

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image(s) in [-1, 1] -> scaled latent `scale * (z - shift)`, [.., z_channels, H/8, W/8].

        z is the posterior mean, or a posterior sample when `sample` (the official code samples;
        the mean is the deterministic choice)."""
        single = x.dim() == 3
        if single:
            x = x.unsqueeze(0)
        moments = self.encoder(x)
        mean, logvar = torch.chunk(moments, 2, dim=1)  # [b, z, h, w] each
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        z = self.scale_factor * (z - self.shift_factor)
        return z[0] if single else z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent(s) -> image(s) in roughly [-1, 1] (not clamped; see `to_uint8_image`)."""
        single = z.dim() == 3
        if single:
            z = z.unsqueeze(0)
        x = self.decoder(z / self.scale_factor + self.shift_factor)
        return x[0] if single else x


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """Decoded [3, H, W] in [-1, 1] -> uint8 [H, W, 3].

    Truncates rather than rounds, as the official code does, so outputs match it bit for bit."""
    x = ((x.detach() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def load_ae(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device="cpu") -> AutoEncoder:
    """The autoencoder of a checkpoint (ae.safetensors), built on the meta device and given its weights."""
    with torch.device("meta"):
        model = AutoEncoder(ckpt.config.ae)
    return ckpt.load_weights(model, "ae", dtype, device)
