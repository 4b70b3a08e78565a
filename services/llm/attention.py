"""Attention behind one interface: per-batch metadata + a backend chosen in one registry.

Two operations cover every attention in BAGEL:

* `paged_attention`: a batch of sequences, each = a cached prefix (read through its block table)
  + a block of new tokens. Inside the new block attention is causal (text) or bidirectional (an
  image block); every new token sees the whole cached prefix. GQA: query head h reads KV head
  h // (num_q_heads // num_kv_heads). The new tokens' K/V are passed explicitly (whether or not the
  caller also wrote them to the cache), so a denoising step reads its context without writing to it.
* `varlen_attention`: the ViT's packed bidirectional attention over several images.

Backends: `sdpa` (torch scaled_dot_product_attention, the portable reference, everywhere),
`triton` (services/llm/kernels, the default on CUDA), `flash` (flash-attn, when installed and chosen).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """Describes one packed batch. Tensors live on the compute device; lists are for host-side loops."""

    q_lens: list[int]          # new tokens per sequence
    ctx_lens: list[int]        # cached prefix length per sequence (before the new tokens)
    causal: list[bool]         # True: causal inside the new block (text); False: bidirectional (image)
    cu_q: torch.Tensor         # [B+1] int32, offsets of each sequence's new tokens in the packed q
    ctx_lens_t: torch.Tensor   # [B] int32
    causal_t: torch.Tensor     # [B] int32 (1 causal, 0 bidirectional)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @classmethod
    def build(cls, q_lens: list[int], ctx_lens: list[int], causal: list[bool], block_tables: torch.Tensor,
              block_size: int) -> "AttentionMetadata":
        device = block_tables.device
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
        return cls(list(q_lens), list(ctx_lens), list(causal), cu.to(device),
                   torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                   torch.tensor([int(c) for c in causal], dtype=torch.int32, device=device),
                   block_tables, block_size)


class AttentionBackend(Protocol):
    name: str

    def paged_attention(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float) -> torch.Tensor:
        """q: [Tq, Hq, D]; k_new, v_new: [Tq, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D].
        Returns [Tq, Hq, D]."""

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, scale: float) -> torch.Tensor:
        """Bidirectional attention within each packed sequence. q, k, v: [T, H, D]; returns [T, H, D]."""


def gather_prefix(k_cache: torch.Tensor, v_cache: torch.Tensor, table_row: torch.Tensor, length: int):
    """Walk one sequence's block table: its first `length` cached K/V, [length, Hkv, D] each."""
    block_size = k_cache.shape[1]
    nb = -(-length // block_size)
    idx = table_row[:nb].long()
    # index_select, not k_cache[idx]: on the CPU advanced indexing of the pool takes milliseconds
    k = k_cache.index_select(0, idx).flatten(0, 1)[:length]
    v = v_cache.index_select(0, idx).flatten(0, 1)[:length]
    return k, v


def prefix_block_mask(q_len: int, ctx_len: int, causal: bool, device) -> torch.Tensor | None:
    """[q_len, ctx_len + q_len] bool (True = may attend), or None when everything is visible."""
    if not causal or q_len == 1:
        return None
    new = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    old = torch.ones(q_len, ctx_len, dtype=torch.bool, device=device)
    return torch.cat([old, new], dim=1)


class SDPABackend:
    """The readable reference: one torch SDPA call per sequence, prefix gathered through the block table."""

    name = "sdpa"

    def paged_attention(self, q, k_new, v_new, k_cache, v_cache, meta, scale):
        out = torch.empty_like(q)
        rep = q.shape[1] // k_new.shape[1]
        cu = meta.cu_q.tolist()
        for i in range(meta.num_seqs):
            s, e = cu[i], cu[i + 1]
            if e == s:
                continue
            k_old, v_old = gather_prefix(k_cache, v_cache, meta.block_tables[i], meta.ctx_lens[i])
            k = torch.cat([k_old.to(q.dtype), k_new[s:e]], 0)  # [ctx + n, Hkv, D]
            v = torch.cat([v_old.to(q.dtype), v_new[s:e]], 0)
            mask = prefix_block_mask(e - s, meta.ctx_lens[i], meta.causal[i], q.device)
            # [1, H, n, D] layout (4-D and contiguous: torch's CPU flash kernel, not the slow math path); GQA by
            # repeating KV heads.
            qh = q[s:e].transpose(0, 1).contiguous()[None]
            kh = k.transpose(0, 1).repeat_interleave(rep, dim=0)[None]
            vh = v.transpose(0, 1).repeat_interleave(rep, dim=0)[None]
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
            out[s:e] = o[0].transpose(0, 1)
        return out

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen, scale):
        out = torch.empty_like(q)
        cu = cu_seqlens.tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            qh, kh, vh = (x[s:e].transpose(0, 1).contiguous()[None] for x in (q, k, v))  # [1, H, n, D]
            o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
            out[s:e] = o[0].transpose(0, 1)
        return out


# ---- registry: backend selection happens here and nowhere else ----------------------------------
_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {"sdpa": SDPABackend}


def register_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _FACTORIES[name] = factory


def available_backends() -> list[str]:
    _load_optional_backends()
    return sorted(_FACTORIES)


def _load_optional_backends() -> None:
    # Importing a backend module registers it when its dependencies are present.
    try:
        from services.llm.kernels import backend as _triton  # noqa: F401
    except ImportError as e:  # triton missing: the SDPA reference still works
        log.debug("triton attention backend unavailable: %s", e)


def default_backend_name(device: torch.device | str) -> str:
    """Triton on CUDA by default, SDPA everywhere else; BAGEL_ATTENTION_BACKEND overrides."""
    chosen = os.environ.get("BAGEL_ATTENTION_BACKEND")
    if chosen:
        return chosen
    return "triton" if torch.device(device).type == "cuda" and "triton" in available_backends() else "sdpa"


def get_backend(name: str | None = None, device: torch.device | str = "cpu") -> AttentionBackend:
    name = name or default_backend_name(device)
    _load_optional_backends()
    if name not in _FACTORIES:
        raise ValueError(f"attention backend {name!r} is not available here; available: {sorted(_FACTORIES)}")
    backend = _FACTORIES[name]()
    log.info("attention backend: %s", backend.name)
    return backend
