"""The triton backend's per-batch state: what its kernels read from an AttentionMetadata, checked once.

One batch's metadata serves every layer of a forward, so `TritonBackend.prepare` builds a TritonBatch
once and returns a copy of the metadata carrying it in `backend_state`. A kernel handed metadata that
was not prepared (or prepared for another device) builds a TritonBatch for that call only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.attention.metadata import AttentionMetadata


def _as_index(t: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """Small int32 metadata tensors: converted (cheap) rather than rejected."""
    if t.device != device:
        raise ValueError(f"triton attention: meta.{name} is on {t.device}, the tensors on {device}")
    if t.dtype != torch.int32 or not t.is_contiguous():
        t = t.to(torch.int32).contiguous()
    return t


@dataclass(eq=False)
class TritonBatch:
    device: torch.device
    q_lens: list[int]
    ctx_lens: list[int]
    causal: list[bool]
    block_size: int
    total_q: int                 # sum(q_lens): the packed q's length
    decode: bool                 # every q_len == 1: the split-K decode kernel
    cu_q: torch.Tensor           # [B+1] int32, contiguous, on `device` (likewise the three below)
    ctx_lens_t: torch.Tensor     # [B]
    causal_t: torch.Tensor       # [B]
    block_tables: torch.Tensor   # [B, max_blocks]
    # BLOCK_M -> the prefill kernel's (tile -> sequence, tile -> first row) map, made by paged_prefill on
    # first use: BLOCK_M depends on head_dim and dtype, which the metadata does not know.
    tile_maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @classmethod
    def build(cls, meta: AttentionMetadata, device: torch.device) -> "TritonBatch":
        b = len(meta.q_lens)
        if len(meta.ctx_lens) != b or len(meta.causal) != b:
            raise ValueError(f"triton attention: meta has {b} q_lens, {len(meta.ctx_lens)} ctx_lens, "
                             f"{len(meta.causal)} causal flags")
        if meta.block_tables.dim() != 2 or meta.block_tables.shape[0] != b:
            raise ValueError(f"triton attention: block_tables must be [B={b}, max_blocks], got "
                             f"{tuple(meta.block_tables.shape)}")
        need_blocks = max([-(-c // meta.block_size) for c in meta.ctx_lens], default=0)
        if need_blocks > meta.block_tables.shape[1]:
            raise ValueError(f"triton attention: a prefix needs {need_blocks} blocks, block_tables has "
                             f"{meta.block_tables.shape[1]} columns")
        return cls(device=device, q_lens=list(meta.q_lens), ctx_lens=list(meta.ctx_lens), causal=list(meta.causal),
                   block_size=meta.block_size, total_q=sum(meta.q_lens),
                   decode=b > 0 and all(n == 1 for n in meta.q_lens),
                   cu_q=_as_index(meta.cu_q, "cu_q", device),
                   ctx_lens_t=_as_index(meta.ctx_lens_t, "ctx_lens_t", device),
                   causal_t=_as_index(meta.causal_t, "causal_t", device),
                   block_tables=_as_index(meta.block_tables, "block_tables", device))

    @classmethod
    def of(cls, meta: "AttentionMetadata | TritonBatch", device: torch.device) -> "TritonBatch":
        """The batch state prepared for `device`, or one built now (for this call only)."""
        state = meta if isinstance(meta, TritonBatch) else meta.backend_state
        if isinstance(state, TritonBatch) and state.device == device:
            return state
        return cls.build(meta, device)
