"""Packed prefill / denoise attention over a paged KV cache (Triton).

One program handles BLOCK_M query rows of one sequence for one query head. It keeps flash-attention
running values (m_i: row max, l_i: row sum, acc: unnormalised output) in fp32 and walks the keys in
two phases:

1. the cached prefix, read token by token through the sequence's block table (every new token sees
   all of it, so no causal mask; only the last partial BLOCK_N is masked);
2. the new tokens' own K/V (k_new, v_new, packed like q): causal (text) or bidirectional (image block)
   per sequence, decided at run time from meta.causal_t.

Scores live in the log2 domain (qk * scale * log2(e)) so the exponentials are exp2.
Head dims that are not a power of two are padded to HEAD_DIM_PAD inside the kernel with masked
loads/stores; memory is never padded. (The LLM's head_dim is 128; the ViT's 72 goes through varlen.py,
which splits the head dim instead of padding it.)

The inner-loop helpers here are shared with paged_decode.py; varlen.py has its own inner loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.attention.metadata import AttentionMetadata

from .batch import TritonBatch

LOG2E = 1.4426950408889634
# Finite "minus infinity" for the running max: a row whose every key is masked in one block then
# gives exp2(-inf - m) = 0 and alpha = 1 instead of NaN from (-inf) - (-inf).
NEG_BIG = tl.constexpr(-1.0e30)


# ---- shared @triton.jit helpers ------------------------------------------------------------------
@triton.jit
def _load_2d(ptrs, row_mask, col_mask, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a tile, masking only the dimensions that can run out of bounds (unmasked loads vectorise)."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=col_mask[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _softmax_update(acc, l_i, m_i, q, k, v, qk_scale, mask, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step: fold the keys k / values v ([BLOCK_N, HEAD_DIM_PAD]) into (acc, l_i, m_i)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_MASK:
        qk = tl.where(mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    # The second dot runs in the input dtype (fp16/bf16 tensor cores), accumulating in fp32.
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _paged_kv_inner(acc, l_i, m_i, q, K_cache, V_cache, bt_row, k_head_off, v_head_off,
                    stride_kb, stride_kt, stride_vb, stride_vt,
                    lo, hi, kv_len, qk_scale, offs_n, offs_d,
                    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HEAD_DIM_PAD: tl.constexpr, MASK_N: tl.constexpr, PAGE_TILES: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """Keys/values at cached positions [lo, hi) of one sequence, gathered through its block table row.

    Every query row sees every cached position, so the only mask is pos < kv_len (MASK_N, last block).
    PAGE_TILES (BLOCK_N a multiple of a power-of-two PAGE_SIZE, lo a multiple of BLOCK_N): look the
    table up once per page; otherwise once per position (any page size).
    """
    MASK_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        pos = start_n + offs_n
        n_mask = pos < kv_len
        if PAGE_TILES:
            # BLOCK_N spans whole pages (lo is page aligned): one table entry per page, not per token.
            NUM_PAGES: tl.constexpr = BLOCK_N // PAGE_SIZE
            page = start_n // PAGE_SIZE + tl.arange(0, NUM_PAGES)
            if MASK_N:
                blk = tl.load(bt_row + page, mask=page * PAGE_SIZE < kv_len, other=0)
            else:
                blk = tl.load(bt_row + page)
            blk = blk.to(tl.int64)  # block * stride can pass 2**31 elements in a large pool
            in_page = tl.arange(0, PAGE_SIZE)
            k_rows = tl.reshape(blk[:, None] * stride_kb + in_page[None, :] * stride_kt, [BLOCK_N])
            v_rows = tl.reshape(blk[:, None] * stride_vb + in_page[None, :] * stride_vt, [BLOCK_N])
        else:
            # Physical slot of each position: block id from the table, offset inside the block.
            if MASK_N:
                blk = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0)
            else:
                blk = tl.load(bt_row + pos // PAGE_SIZE)
            blk = blk.to(tl.int64)
            slot = pos % PAGE_SIZE
            k_rows = blk * stride_kb + slot * stride_kt
            v_rows = blk * stride_vb + slot * stride_vt
        k_ptrs = K_cache + k_head_off + k_rows[:, None] + offs_d[None, :]
        v_ptrs = V_cache + v_head_off + v_rows[:, None] + offs_d[None, :]
        k = _load_2d(k_ptrs, n_mask, d_mask, MASK_N, MASK_D).to(q.dtype)
        v = _load_2d(v_ptrs, n_mask, d_mask, MASK_N, MASK_D).to(q.dtype)
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, q, k, v, qk_scale, n_mask[None, :], MASK_N, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _dense_kv_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                    lo, hi, kv_len, is_causal, qk_scale, offs_m, offs_n, offs_d,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    MASK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Keys/values [lo, hi) of a contiguous (strided) K/V run: the new block, or a ViT image.

    offs_m are the query rows' positions in the same run (for the causal mask). Blocks that can hold
    neither an out-of-range key nor a key after the diagonal run with MASK_N=False: no mask work.
    """
    MASK_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < kv_len
        k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]
        k = _load_2d(k_ptrs, n_mask, d_mask, MASK_N, MASK_D).to(q.dtype)
        v = _load_2d(v_ptrs, n_mask, d_mask, MASK_N, MASK_D).to(q.dtype)
        mask = n_mask[None, :] & ((is_causal == 0) | (cols[None, :] <= offs_m[:, None]))
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, q, k, v, qk_scale, mask, MASK_N, DOT_PREC)
    return acc, l_i, m_i


# ---- the kernel ----------------------------------------------------------------------------------
@triton.jit
def _paged_prefill_kernel(
        Q, K_new, V_new, K_cache, V_cache, Out,
        cu_q, ctx_lens, causal_flags, block_tables, tile_seq, tile_m0,
        stride_qt, stride_qh, stride_knt, stride_knh, stride_vnt, stride_vnh,
        stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
        stride_ot, stride_oh, stride_bt,
        qk_scale,
        GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAGE_TILES: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP

    # The host's tile map says which sequence and which rows of it this program owns.
    seq = tl.load(tile_seq + tile)
    m0 = tl.load(tile_m0 + tile)
    q_start = tl.load(cu_q + seq)
    q_len = tl.load(cu_q + seq + 1) - q_start
    ctx_len = tl.load(ctx_lens + seq)
    is_causal = tl.load(causal_flags + seq)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM

    q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # Phase 1: cached prefix through the block table; whole blocks first, then the masked tail.
    bt_row = block_tables + seq * stride_bt
    ctx_full = (ctx_len // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _paged_kv_inner(acc, l_i, m_i, q, K_cache, V_cache, bt_row, kv_head * stride_kch,
                                    kv_head * stride_vch, stride_kcb, stride_kct, stride_vcb, stride_vct,
                                    0, ctx_full, ctx_len, qk_scale, offs_n, offs_d,
                                    PAGE_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, PAGE_TILES, DOT_PREC)
    acc, l_i, m_i = _paged_kv_inner(acc, l_i, m_i, q, K_cache, V_cache, bt_row, kv_head * stride_kch,
                                    kv_head * stride_vch, stride_kcb, stride_kct, stride_vcb, stride_vct,
                                    ctx_full, ctx_len, ctx_len, qk_scale, offs_n, offs_d,
                                    PAGE_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, PAGE_TILES, DOT_PREC)

    # Phase 2: the new block. Causal: keys [0, m0) are all visible to every row of the tile (m0 is a
    # multiple of BLOCK_N), the diagonal part [m0, m0 + BLOCK_M) is masked. Bidirectional: all
    # q_len keys, masked only in the last partial block.
    new_full = tl.where(is_causal != 0, m0, (q_len // BLOCK_N) * BLOCK_N)
    new_hi = tl.where(is_causal != 0, tl.minimum(m0 + BLOCK_M, q_len), q_len)
    k_base = K_new + q_start * stride_knt + kv_head * stride_knh
    v_base = V_new + q_start * stride_vnt + kv_head * stride_vnh
    acc, l_i, m_i = _dense_kv_inner(acc, l_i, m_i, q, k_base, v_base, stride_knt, stride_vnt,
                                    0, new_full, q_len, is_causal, qk_scale, offs_m, offs_n, offs_d,
                                    BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, DOT_PREC)
    acc, l_i, m_i = _dense_kv_inner(acc, l_i, m_i, q, k_base, v_base, stride_knt, stride_vnt,
                                    new_full, new_hi, q_len, is_causal, qk_scale, offs_m, offs_n, offs_d,
                                    BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, DOT_PREC)

    # Every real row saw at least its own key, so l_i > 0 there; padded rows are not stored.
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    o_ptrs = Out + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# ---- host side -----------------------------------------------------------------------------------
def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def use_page_tiles(page_size: int, block_n: int, override: bool | None = None) -> bool:
    """Per-page table lookups (PAGE_TILES) need BLOCK_N to be a multiple of a power-of-two page size.
    Opt-in (override=True) for now: that path is checked under the interpreter but was not yet compiled
    or timed on a GPU (benchmarks/attention.py --sweep compares both); the per-position path is."""
    ok = page_size == next_pow2(page_size) and block_n % page_size == 0
    return bool(override) and ok


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 dots ("ieee", FMA; plain tf32 would be ~1e-3 off the fp32 reference).
    fp32 is the CPU/test path, not the serving one. fp16/bf16 ignore this and use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def is_interpreter(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def prefill_config(head_dim_pad: int, interpret: bool, elem_size: int = 2) -> dict:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): one config, no autotune (the interpreter can't)."""
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if elem_size > 2:  # fp32 tiles: half the rows/keys so the pipelined K/V stages fit in shared memory
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim_pad <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim_pad <= 128:  # H100 sweep (benchmarks/attention.py --sweep): best for denoise, prefill, ViT
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def build_tile_map(q_lens: list[int], ctx_lens: list[int], causal: list[bool], block_m: int,
                   device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile -> sequence, tile -> first row) over all sequences, the most expensive tiles first so the
    long causal tail tiles start early and the short ones fill in at the end."""
    tiles = []
    for i, (n, c, causal_i) in enumerate(zip(q_lens, ctx_lens, causal)):
        for m0 in range(0, n, block_m):
            work = c + (min(m0 + block_m, n) if causal_i else n)
            tiles.append((work, i, m0))
    tiles.sort(key=lambda t: -t[0])
    seq = torch.tensor([t[1] for t in tiles], dtype=torch.int32)
    m0 = torch.tensor([t[2] for t in tiles], dtype=torch.int32)
    return seq.to(device, non_blocking=True), m0.to(device, non_blocking=True)


def _tile_map(batch: TritonBatch, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # One batch serves every layer: build (and copy to the device) its tile map once per BLOCK_M.
    if block_m not in batch.tile_maps:
        batch.tile_maps[block_m] = build_tile_map(batch.q_lens, batch.ctx_lens, batch.causal, block_m, batch.device)
    return batch.tile_maps[block_m]


def paged_prefill(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, meta: AttentionMetadata | TritonBatch, scale: float, *,
                  block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, page_tiles: bool | None = None) -> torch.Tensor:
    """Packed prefill/denoise attention. Shapes as AttentionBackend.paged_attention (validated by the
    backend); `meta` prepared or not (see batch.py); the keyword arguments override the launch config
    (benchmarks, tests)."""
    batch = TritonBatch.of(meta, q.device)
    tq, hq, d = q.shape
    hkv = k_new.shape[1]
    out = torch.empty_like(q)
    if tq == 0:
        return out
    d_pad = max(16, next_pow2(d))
    cfg = prefill_config(d_pad, is_interpreter(q), q.element_size())
    block_m = block_m or cfg["BLOCK_M"]
    block_n = block_n or cfg["BLOCK_N"]
    if block_m < 16 or block_n < 16 or block_m % block_n:
        raise ValueError(f"need BLOCK_M, BLOCK_N >= 16 and BLOCK_M % BLOCK_N == 0, got {block_m}, {block_n}")
    tile_seq, tile_m0 = _tile_map(batch, block_m)
    bt = batch.block_tables
    grid = (tile_seq.numel(), hq)
    _paged_prefill_kernel[grid](
        q, k_new, v_new, k_cache, v_cache, out,
        batch.cu_q, batch.ctx_lens_t, batch.causal_t, bt, tile_seq, tile_m0,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), bt.stride(0),
        scale * LOG2E,
        GROUP=hq // hkv, PAGE_SIZE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=d, HEAD_DIM_PAD=d_pad, PAGE_TILES=use_page_tiles(k_cache.shape[1], block_n, page_tiles),
        DOT_PREC=dot_precision(q.dtype),
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out


def prefill_flops(q_lens: list[int], ctx_lens: list[int], causal: list[bool], num_q_heads: int,
                  head_dim: int) -> float:
    """4 * sum(q_len * k_len_effective) * Hq * D: QK^T and PV, 2 FLOPs per multiply-add; the causal new
    block counts half its square (what a causal kernel computes, up to the diagonal blocks)."""
    pairs = 0.0
    for n, c, causal_i in zip(q_lens, ctx_lens, causal):
        pairs += n * c + (n * n / 2 if causal_i else n * n)
    return 4.0 * pairs * num_q_heads * head_dim


__all__ = ["paged_prefill", "prefill_flops", "build_tile_map", "LOG2E", "dot_precision"]
