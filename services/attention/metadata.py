"""What one packed batch looks like to attention, and how its cached prefixes are laid out.

The paged KV cache pool, per layer, is `[num_blocks, block_size, num_kv_heads, head_dim]` for K and
for V; a sequence's cached prefix is the first `ctx_len` slots of the blocks its block-table row
names, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class AttentionMetadata:
    """Describes one packed batch; built once per forward and shared by every layer, never changed.

    Tensors live on the compute device; lists are for host-side loops. `backend_state` is what a
    backend's `prepare()` computed once for this batch (its own type; None until prepared): the
    backend returns a copy that carries it, so nothing is written into a metadata object after it
    was built.
    """

    q_lens: list[int]          # new tokens per sequence
    ctx_lens: list[int]        # cached prefix length per sequence (before the new tokens)
    causal: list[bool]         # True: causal inside the new block (text); False: bidirectional (image)
    cu_q: torch.Tensor         # [B+1] int32, offsets of each sequence's new tokens in the packed q
    ctx_lens_t: torch.Tensor   # [B] int32
    causal_t: torch.Tensor     # [B] int32 (1 causal, 0 bidirectional)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    block_size: int
    backend_state: object | None = field(default=None, repr=False)

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


def gather_prefix(k_cache: torch.Tensor, v_cache: torch.Tensor, table_row: torch.Tensor, length: int):
    """Walk one sequence's block table: its first `length` cached K/V, [length, Hkv, D] each."""
    block_size = k_cache.shape[1]
    nb = -(-length // block_size)
    idx = table_row[:nb].long()
    # index_select, not k_cache[idx]: on the CPU advanced indexing of the pool takes milliseconds
    k = k_cache.index_select(0, idx).flatten(0, 1)[:length]  # [nb, block, Hkv, D] -> [length, Hkv, D]
    v = v_cache.index_select(0, idx).flatten(0, 1)[:length]
    return k, v
