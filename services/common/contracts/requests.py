"""What a workflow hands the LLM: the ordered context items, the decoding and image parameters, and the
session a request belongs to. Plain data with their validation rules; no model code and no torch import
(tensor fields are typed, not touched), so the gateway and the worker can use them too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.contracts.errors import InputError

if TYPE_CHECKING:
    import torch

    from services.common.config import BagelConfig

# The reference's decoding budgets: 512 answer tokens; 1000 when the text starts with thinking.
ANSWER_TOKENS, THINK_TOKENS = 512, 1000
MAX_NEW_TOKENS = 32768
THINK_END = "</think>"


def partial_think_end(text: str) -> int:
    """Length of the longest proper prefix of `</think>` that `text` ends with: text a streaming reader
    holds back, since the tag may still complete."""
    for n in range(len(THINK_END) - 1, 0, -1):
        if text.endswith(THINK_END[:n]):
            return n
    return 0
RENORM_TYPES = ("global", "channel", "text_channel")
# A session as the LLM service keeps it; the gateway refuses the same values before accepting a job.
MAX_SESSION_ID = 256           # characters, printable
MAX_SESSION_TTL_S = 24 * 3600  # idle time before the service frees it


# ---- context items -----------------------------------------------------------------------------------
@dataclass
class TextItem:
    text: str


@dataclass
class ViTImageItem:
    features: torch.Tensor  # [h*w, vit_hidden], the ViT's post_layernorm output
    grid: tuple[int, int]   # (h, w) patches


@dataclass
class VAEImageItem:
    latent: torch.Tensor    # [z_channels, H/8, W/8], scaled and shifted


ContextItem = TextItem | ViTImageItem | VAEImageItem


@dataclass(frozen=True)
class SessionRef:
    """A conversation kept by the LLM side between calls (multi-turn chat, iterative editing). The same
    parameter for the in-process engine and the gRPC service."""

    id: str
    ttl_s: int = 0  # idle time before it is freed; 0 = the server's default
    # A later turn: refused (SessionLost) when the server no longer has the session, never a fresh start.
    resume: bool = False


# ---- parameters ----------------------------------------------------------------------------------------
@dataclass
class TextParams:
    max_new_tokens: int = ANSWER_TOKENS
    do_sample: bool = False
    temperature: float = 0.3
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InputError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {self.max_new_tokens}")
        if self.do_sample and not 0.0 < self.temperature <= 10.0:
            raise InputError(f"temperature must be in (0, 10], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class ImageParams:
    width: int = 1024
    height: int = 1024
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_min: float = 0.0
    cfg_renorm_type: str = "global"
    timestep_shift: float = 3.0
    num_timesteps: int = 50
    seed: int | None = None
    noise: torch.Tensor | None = None  # explicit initial noise [h*w, 64]; overrides seed

    @classmethod
    def for_edit(cls, width: int, height: int, **overrides) -> "ImageParams":
        """The reference's editing defaults."""
        base = dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
        return cls(width=width, height=height, **{**base, **overrides})

    def validate(self, cfg: BagelConfig) -> None:
        step, max_side = cfg.latent_downsample, cfg.max_image_side
        for name, side in (("width", self.width), ("height", self.height)):
            if isinstance(side, bool) or not isinstance(side, int):
                raise InputError(f"{name} must be an integer, got {side!r}")
            if side <= 0 or side % step or side > max_side:
                raise InputError(f"{name} must be a positive multiple of {step} up to {max_side}, got {side}")
        if not 2 <= self.num_timesteps <= 1000:
            raise InputError(f"num_timesteps must be in [2, 1000], got {self.num_timesteps}")
        if not 0.0 < self.timestep_shift <= 100.0:
            raise InputError(f"timestep_shift must be in (0, 100], got {self.timestep_shift}")
        for name in ("cfg_text_scale", "cfg_img_scale"):
            if not 0.0 <= getattr(self, name) <= 100.0:
                raise InputError(f"{name} must be in [0, 100], got {getattr(self, name)}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise InputError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        if not 0.0 <= self.cfg_renorm_min <= 1.0:
            raise InputError(f"cfg_renorm_min must be in [0, 1], got {self.cfg_renorm_min}")
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise InputError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        tokens = (self.height // step) * (self.width // step)
        if self.noise is not None and tuple(self.noise.shape) != (tokens, cfg.patch_latent_dim):
            raise InputError(f"noise must have shape [{tokens}, {cfg.patch_latent_dim}], got {list(self.noise.shape)}")
