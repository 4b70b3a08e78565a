"""Write a randomly initialised checkpoint in exactly the official layout, key names and file set (the
embedded default model, tests and benchmarks). It builds the real models to get their keys and shapes,
so it lives here rather than next to the reader in services/common/checkpoint.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from services.common.checkpoint import AE_FILE, EMA_FILE, LLM_CONFIG, VIT_CONFIG, VIT_PREFIX
from services.common.config import BagelConfig, preset
from services.common.tokenizer import TOKENIZER_FILES, packaged_tokenizer_dir
from services.llm.model import BagelLLM
from services.vae.model import AutoEncoder
from services.vit.model import SiglipVisionModel


def sincos_2d_table(hidden: int, side: int) -> torch.Tensor:
    """The fixed 2D sin-cos table (MAE layout): [side*side, hidden], first half from the row index."""
    def one_axis(dim: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.double().reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows = torch.arange(side).repeat_interleave(side)  # row index of entry r*side + c
    cols = torch.arange(side).repeat(side)
    return torch.cat([one_axis(hidden // 2, rows), one_axis(hidden // 2, cols)], dim=1).float()


def _init_(model: nn.Module, generator: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.data.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("bias"):
            p.data.normal_(0.0, 0.02, generator=generator)
        else:  # norm weights: around 1 so every routed copy differs but stays sane
            p.data.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))


def init_checkpoint(preset_name: str, out: str | Path, seed: int = 0, cfg: BagelConfig | None = None) -> Path:
    """Write a randomly initialised checkpoint in exactly the official layout, key names and file set."""
    cfg = cfg or preset(preset_name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    llm = BagelLLM(cfg)
    _init_(llm, gen)
    llm.vit_pos_embed.pos_embed.data.copy_(sincos_2d_table(cfg.llm.hidden_size, cfg.vit_max_num_patch_per_side))
    llm.latent_pos_embed.pos_embed.data.copy_(sincos_2d_table(cfg.llm.hidden_size, cfg.max_latent_size))
    vit = SiglipVisionModel(cfg.vit, cfg.vit_max_num_patch_per_side)
    _init_(vit, gen)
    ae = AutoEncoder(cfg.ae)
    torch.manual_seed(seed)  # the AE keeps PyTorch's default conv init, seeded
    ae.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)

    ema = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in llm.state_dict().items()}
    ema.update({VIT_PREFIX + k: v.detach().to(torch.bfloat16).contiguous() for k, v in vit.state_dict().items()})
    save_file(ema, str(out / EMA_FILE), metadata={"format": "pt"})
    save_file({k: v.detach().float().contiguous() for k, v in ae.state_dict().items()}, str(out / AE_FILE),
              metadata={"format": "pt"})
    (out / LLM_CONFIG).write_text(json.dumps(cfg.llm.to_json(), indent=2))
    (out / VIT_CONFIG).write_text(json.dumps(cfg.vit.to_json(), indent=2))
    src = packaged_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out / name)
    return out

