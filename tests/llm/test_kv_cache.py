"""The paged KV cache: appends without copies, forks that share blocks, copy-on-write, O(blocks) free."""

from __future__ import annotations

import pytest
import torch

from services.llm.kv_cache import KVCacheFull, PagedKVCache


def fill(cache, ctx, n, base):
    slots = cache.reserve(ctx, n)
    vals = base + torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 1, 2)
    cache.write(0, slots, vals, -vals)
    return vals


def read(cache, ctx):
    table = cache.block_table([ctx])[0]
    return cache.gather(0, table, ctx.length)


def test_append_and_gather_round_trip_across_blocks():
    cache = PagedKVCache(1, 1, 2, num_blocks=8, block_size=4)
    ctx = cache.new_context()
    a = fill(cache, ctx, 3, 0)
    b = fill(cache, ctx, 7, 100)
    k, v = read(cache, ctx)
    torch.testing.assert_close(k, torch.cat([a, b]))
    torch.testing.assert_close(v, -torch.cat([a, b]))
    assert len(ctx.blocks) == 3 and cache.blocks_in_use == 3


def test_fork_shares_blocks_and_copy_on_write_keeps_both_views():
    cache = PagedKVCache(1, 1, 2, num_blocks=8, block_size=4)
    parent = cache.new_context()
    base = fill(cache, parent, 6, 0)  # 1.5 blocks
    child = cache.fork(parent)
    assert child.blocks == parent.blocks and cache.blocks_in_use == 2  # nothing copied
    extra = fill(cache, child, 3, 50)
    assert child.blocks[0] == parent.blocks[0]  # the full block stays shared
    assert child.blocks[1] != parent.blocks[1]  # the partly filled one was copied before the write
    torch.testing.assert_close(read(cache, parent)[0], base)
    torch.testing.assert_close(read(cache, child)[0], torch.cat([base, extra]))
    more = fill(cache, parent, 2, 900)
    torch.testing.assert_close(read(cache, parent)[0], torch.cat([base, more]))
    torch.testing.assert_close(read(cache, child)[0], torch.cat([base, extra]))


def test_free_returns_blocks_only_when_unshared():
    cache = PagedKVCache(1, 1, 2, num_blocks=4, block_size=4)
    a = cache.new_context()
    fill(cache, a, 8, 0)
    b = cache.fork(a)
    cache.free(a)
    assert cache.blocks_in_use == 2  # b still holds them
    torch.testing.assert_close(read(cache, b)[0][:, 0, 0], torch.arange(8, dtype=torch.float32))
    cache.free(b)
    assert cache.blocks_in_use == 0
    cache.free(b)  # freeing twice is harmless
    assert cache.blocks_in_use == 0
    with pytest.raises(ValueError, match="freed"):
        cache.reserve(b, 1)


def test_full_pool_raises_without_corrupting_state():
    cache = PagedKVCache(1, 1, 2, num_blocks=2, block_size=4)
    ctx = cache.new_context()
    fill(cache, ctx, 7, 0)
    with pytest.raises(KVCacheFull):
        cache.reserve(ctx, 5)
    assert ctx.length == 7 and cache.blocks_in_use == 2
