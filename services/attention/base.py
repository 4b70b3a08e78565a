"""The interface every attention backend implements, and the error for one that cannot run here."""

from __future__ import annotations

from typing import Protocol

import torch

from services.attention.metadata import AttentionMetadata


class BackendUnavailable(RuntimeError):
    """A known backend that cannot run in this process (a missing package, no device for it)."""


class AttentionBackend(Protocol):
    name: str

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        """Once per batch, before the first layer: `meta`, or a copy carrying this backend's per-batch
        state in `backend_state`. Optional for callers: an unprepared batch gives the same results,
        the backend then redoes that work at every call."""

    def paged_attention(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float) -> torch.Tensor:
        """q: [Tq, Hq, D]; k_new, v_new: [Tq, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D].
        Returns [Tq, Hq, D]."""

    def varlen_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, scale: float) -> torch.Tensor:
        """Bidirectional attention within each packed sequence. q, k, v: [T, H, D]; returns [T, H, D]."""
