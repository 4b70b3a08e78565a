"""A paged KV cache: one preallocated pool of fixed-size blocks per layer, block tables per context.

A context (a request's CFG branch, a chat session) owns a list of block ids and a length. Appending
writes into the context's last block or takes fresh ones: nothing is copied. Forking shares every
block (reference counts); the first append to a shared, partly filled last block copies that one
block (copy-on-write), so a fork costs O(1) blocks whatever the context length. Freeing is
O(blocks). The pool layout, per layer, is `[num_blocks, block_size, num_kv_heads, head_dim]`,
the layout the Triton kernels read through block tables.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from services.common.contracts import ResourceExhausted

from services.attention import gather_prefix


class KVCacheFull(ResourceExhausted):
    """The pool has no free block left: the caller should reject or queue the request."""


@dataclass
class KVContext:
    """One sequence's cached prefix. `rope_position` is the next RoPE position (BAGEL's `curr_rope`)."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    rope_position: int = 0
    freed: bool = False


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size = num_blocks, block_size
        # [layers, num_blocks, block_size, kv_heads, head_dim]
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._refcount = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives low ids first
        self._lock = threading.Lock()

    # ---- accounting -------------------------------------------------------------------------
    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def blocks_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, ctx: KVContext, extra_tokens: int) -> int:
        have = len(ctx.blocks) * self.block_size
        return max(0, -(-(ctx.length + extra_tokens - have) // self.block_size))

    # ---- context lifecycle ------------------------------------------------------------------
    def new_context(self) -> KVContext:
        return KVContext()

    def fork(self, ctx: KVContext) -> KVContext:
        """A new context with the same contents, sharing all blocks."""
        self._check_alive(ctx)
        with self._lock:
            for b in ctx.blocks:
                self._refcount[b] += 1
        return KVContext(blocks=list(ctx.blocks), length=ctx.length, rope_position=ctx.rope_position)

    def free(self, ctx: KVContext) -> None:
        if ctx.freed:
            return
        with self._lock:
            for b in ctx.blocks:
                self._refcount[b] -= 1
                if self._refcount[b] == 0:
                    self._free.append(b)
        ctx.blocks, ctx.length, ctx.freed = [], 0, True

    # ---- writing ----------------------------------------------------------------------------
    def reserve(self, ctx: KVContext, n_tokens: int) -> torch.Tensor:
        """Make room for `n_tokens` more tokens and return their flat slot ids (block * size + offset).

        The context's length grows by n_tokens; the caller then writes K/V of every layer to those slots.
        """
        self._check_alive(ctx)
        bs = self.block_size
        with self._lock:
            need = self.blocks_needed(ctx, n_tokens)
            cow = ctx.length % bs != 0 and ctx.blocks and self._refcount[ctx.blocks[-1]] > 1
            if need + int(bool(cow)) > len(self._free):
                raise KVCacheFull(f"KV cache full: need {need + int(bool(cow))} blocks, {len(self._free)} free "
                                  f"of {self.num_blocks}")
            if cow:  # the last block is shared and partly filled: copy it before writing into it
                old = ctx.blocks[-1]
                new = self._free.pop()
                self._refcount[new] = 1
                self._refcount[old] -= 1
                self.k[:, new].copy_(self.k[:, old])
                self.v[:, new].copy_(self.v[:, old])
                ctx.blocks[-1] = new
            for _ in range(need):
                b = self._free.pop()
                self._refcount[b] = 1
                ctx.blocks.append(b)
        pos = torch.arange(ctx.length, ctx.length + n_tokens)
        table = torch.tensor(ctx.blocks, dtype=torch.long)
        slots = table[pos // bs] * bs + pos % bs
        ctx.length += n_tokens
        return slots.to(self.k.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, kv_heads, head_dim] written at flat slot ids."""
        # index_copy_: advanced-index assignment into the pool is far slower on the CPU
        self.k[layer].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slots, v.to(self.v.dtype))

    # ---- reading ----------------------------------------------------------------------------
    def block_table(self, contexts: list[KVContext], lengths: list[int] | None = None) -> torch.Tensor:
        """[B, max_blocks] int32, padded with 0 (never read past each sequence's length)."""
        lengths = lengths if lengths is not None else [c.length for c in contexts]
        n = [-(-length // self.block_size) for length in lengths]
        table = torch.zeros((len(contexts), max([1, *n])), dtype=torch.int32)
        for i, (c, k) in enumerate(zip(contexts, n)):
            if k:
                table[i, :k] = torch.tensor(c.blocks[:k], dtype=torch.int32)
        return table.to(self.k.device)

    def gather(self, layer: int, ctx_blocks: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` cached K/V of one sequence: [length, kv_heads, head_dim] each."""
        return gather_prefix(self.k[layer], self.v[layer], ctx_blocks, length)

    def _check_alive(self, ctx: KVContext) -> None:
        if ctx.freed:
            raise ValueError("KV context was already freed")
