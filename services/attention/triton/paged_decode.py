"""Decode attention (Triton): one new query token per sequence over a long paged context, split-K.

A single long sequence would give only Hkv programs, far too few to fill a GPU, so the cached
context is cut into NUM_SPLITS partitions of `partition_size` positions. Program (split, kv_head,
seq) folds its partition into partial flash-attention values (m, l, acc) for all GROUP query heads
that share the KV head: the heads are the rows of the tile (padded to >= 16 so tl.dot applies), so
each K/V block is read once for the whole group. A second, small kernel merges the partials of each
(seq, head) together with the new token itself (its K/V come from k_new/v_new, not the cache) and
normalises.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.attention.metadata import AttentionMetadata

from .batch import TritonBatch
from .paged_prefill import (LOG2E, NEG_BIG, _paged_kv_inner, dot_precision, is_interpreter, next_pow2,
                            use_page_tiles)


@triton.jit
def _decode_partition_kernel(
        Q, K_cache, V_cache, block_tables, ctx_lens, M_part, L_part, Acc_part,
        stride_qt, stride_qh, stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
        stride_bt, partition_size, num_splits, num_q_heads, qk_scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAGE_TILES: tl.constexpr, DOT_PREC: tl.constexpr):
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)

    ctx_len = tl.load(ctx_lens + seq)
    lo = split * partition_size
    hi = tl.minimum(lo + partition_size, ctx_len)  # hi <= lo: an empty partition, written as (-big, 0, 0)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g

    # Every q_len is 1, so sequence `seq`'s query is packed row `seq`.
    q_ptrs = Q + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    # partition_size is a multiple of BLOCK_N: whole blocks unmasked, then the masked tail.
    full_hi = tl.maximum(lo + ((hi - lo) // BLOCK_N) * BLOCK_N, lo)
    bt_row = block_tables + seq * stride_bt
    acc, l_i, m_i = _paged_kv_inner(acc, l_i, m_i, q, K_cache, V_cache, bt_row, kv_head * stride_kch,
                                    kv_head * stride_vch, stride_kcb, stride_kct, stride_vcb, stride_vct,
                                    lo, full_hi, ctx_len, qk_scale, offs_n, offs_d,
                                    PAGE_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, PAGE_TILES, DOT_PREC)
    acc, l_i, m_i = _paged_kv_inner(acc, l_i, m_i, q, K_cache, V_cache, bt_row, kv_head * stride_kch,
                                    kv_head * stride_vch, stride_kcb, stride_kct, stride_vcb, stride_vct,
                                    full_hi, hi, ctx_len, qk_scale, offs_n, offs_d,
                                    PAGE_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, PAGE_TILES, DOT_PREC)

    # Partials: [B, Hq, NUM_SPLITS] for m, l and [B, Hq, NUM_SPLITS, HEAD_DIM] for acc (unnormalised).
    row = (seq * num_q_heads + heads) * num_splits + split
    tl.store(M_part + row, m_i, mask=g_mask)
    tl.store(L_part + row, l_i, mask=g_mask)
    tl.store(Acc_part + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
        Q, K_new, V_new, M_part, L_part, Acc_part, Out,
        stride_qt, stride_qh, stride_knt, stride_knh, stride_vnt, stride_vnh, stride_ot, stride_oh,
        num_splits, num_q_heads, qk_scale,
        GROUP: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP

    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM

    # The new token attends to itself: one more key, its score s_new, its value v_new.
    q = tl.load(Q + seq * stride_qt + head * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    k_new = tl.load(K_new + seq * stride_knt + kv_head * stride_knh + offs_d, mask=d_mask, other=0.0)
    v_new = tl.load(V_new + seq * stride_vnt + kv_head * stride_vnh + offs_d, mask=d_mask, other=0.0)
    s_new = tl.sum(q * k_new.to(tl.float32), 0) * qk_scale

    row = (seq * num_q_heads + head) * num_splits + offs_s
    m = tl.load(M_part + row, mask=s_mask, other=NEG_BIG)
    l = tl.load(L_part + row, mask=s_mask, other=0.0)
    acc = tl.load(Acc_part + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                  other=0.0)

    # Rescale every partial to the global max; empty partitions carry m = -big, so weight 0.
    m_max = tl.maximum(tl.max(m, 0), s_new)
    w = tl.math.exp2(m - m_max)
    w_new = tl.math.exp2(s_new - m_max)
    l_sum = tl.sum(w * l, 0) + w_new
    out = (tl.sum(w[:, None] * acc, 0) + w_new * v_new.to(tl.float32)) / l_sum
    tl.store(Out + seq * stride_ot + head * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)


# ---- host side -----------------------------------------------------------------------------------
def decode_config(interpret: bool, elem_size: int = 2) -> dict:
    if interpret:
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    if elem_size > 2:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# The reduce kernel holds all partials of one (sequence, head) in registers: [SPLITS_PAD, HEAD_DIM_PAD].
MAX_SPLITS = 64


def choose_partition(batch: int, num_kv_heads: int, max_ctx: int, block_n: int, num_sms: int,
                     min_partition: int = 128) -> tuple[int, int]:
    """(partition_size, num_splits): enough programs for ~2 waves of the SMs, but partitions of at least
    `min_partition` positions so each program streams a useful amount of K/V, and at most MAX_SPLITS.
    (H100, Hkv 4, bf16: 128 beat 256 at 1k-4k context, B 1 and 8; at 16k-32k the wave target decides.)"""
    target_splits = max(1, -(-2 * num_sms // max(1, batch * num_kv_heads)))
    max_splits = max(1, -(-max_ctx // max(min_partition, block_n)))
    splits = min(target_splits, max_splits, MAX_SPLITS)
    part = -(-max(max_ctx, 1) // splits)
    part = -(-part // block_n) * block_n
    return part, -(-max(max_ctx, 1) // part)


def paged_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata | TritonBatch, scale: float, *,
                 partition_size: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, page_tiles: bool | None = None) -> torch.Tensor:
    """Decode attention, every meta.q_lens == 1 (validated by the backend). partition_size (a multiple of
    BLOCK_N) overrides the split heuristic."""
    batch = TritonBatch.of(meta, q.device)
    b, hq, d = q.shape
    hkv = k_new.shape[1]
    group = hq // hkv
    out = torch.empty_like(q)
    if b == 0:
        return out
    interpret = is_interpreter(q)
    cfg = decode_config(interpret, q.element_size())
    block_n = block_n or cfg["BLOCK_N"]
    max_ctx = max(batch.ctx_lens)
    if partition_size is None:
        partition_size, num_splits = choose_partition(b, hkv, max_ctx, block_n, _num_sms(q.device))
    else:
        if partition_size % block_n:
            raise ValueError(f"partition_size {partition_size} must be a multiple of BLOCK_N {block_n}")
        num_splits = max(1, -(-max_ctx // partition_size))
        if num_splits > MAX_SPLITS:
            raise ValueError(f"partition_size {partition_size} gives {num_splits} splits of a {max_ctx}-token "
                             f"context; at most {MAX_SPLITS}")
    d_pad = max(16, next_pow2(d))
    # One allocation for the three partial arrays (host overhead matters at decode).
    part = torch.empty(b * hq * num_splits * (d + 2), dtype=torch.float32, device=q.device)
    n = b * hq * num_splits
    m_part, l_part, acc_part = part[:n], part[n:2 * n], part[2 * n:]
    bt = batch.block_tables
    qk_scale = scale * LOG2E
    _decode_partition_kernel[(num_splits, hkv, b)](
        q, k_cache, v_cache, bt, batch.ctx_lens_t, m_part, l_part, acc_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0), partition_size, num_splits, hq, qk_scale,
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)), PAGE_SIZE=k_cache.shape[1],
        BLOCK_N=block_n, HEAD_DIM=d, HEAD_DIM_PAD=d_pad,
        PAGE_TILES=use_page_tiles(k_cache.shape[1], block_n, page_tiles), DOT_PREC=dot_precision(q.dtype),
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    _decode_reduce_kernel[(b, hq)](
        q, k_new, v_new, m_part, l_part, acc_part, out,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        out.stride(0), out.stride(1), num_splits, hq, qk_scale,
        GROUP=group, SPLITS_PAD=max(2, next_pow2(num_splits)), HEAD_DIM=d, HEAD_DIM_PAD=d_pad,
        num_warps=4 if d_pad * num_splits >= 2048 else 1,
    )
    return out


def decode_kv_bytes(ctx_lens: list[int], num_kv_heads: int, head_dim: int, elem_size: int) -> int:
    """Bytes of K and V a decode step must read: every cached position once, plus the new token."""
    return 2 * sum(c + 1 for c in ctx_lens) * num_kv_heads * head_dim * elem_size


__all__ = ["paged_decode", "choose_partition", "decode_kv_bytes"]
