"""A VAE latent as LLM tokens: the 2x2 patching of a latent into the tokens the LLM reads and writes,
and the tokens' ids into its latent position table. Only the LLM side needs these; the VAE service
sends and receives whole latents [C, H, W]."""

from __future__ import annotations

import torch


def patchify_latent(latent: torch.Tensor, p: int = 2) -> torch.Tensor:
    """[C, H, W] latent -> [(H/p)*(W/p), p*p*C] tokens, row-major over the grid, each in (p, q, c) order."""
    c, hh, ww = latent.shape
    h, w = hh // p, ww // p
    x = latent.reshape(c, h, p, w, p)  # [c, rows, p, cols, q]
    x = torch.einsum("chpwq->hwpqc", x)  # [rows, cols, p, q, c]
    return x.reshape(h * w, p * p * c)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int = 2, c: int = 16) -> torch.Tensor:
    """Inverse of `patchify_latent`: [h*w, p*p*c] tokens of an h x w grid -> [c, h*p, w*p]."""
    x = tokens.reshape(h, w, p, p, c)  # [rows, cols, p, q, c]
    x = torch.einsum("hwpqc->chpwq", x)  # [c, rows, p, cols, q]
    return x.reshape(c, h * p, w * p)


def latent_position_ids(h: int, w: int, max_latent_size: int) -> torch.Tensor:
    """Row-major ids `r * max_latent_size + c` of an h x w token grid into the latent_pos_embed table."""
    rows = torch.arange(h, dtype=torch.long)
    cols = torch.arange(w, dtype=torch.long)
    return (rows[:, None] * max_latent_size + cols[None, :]).flatten()
