"""The ViT's packed bidirectional varlen attention (Triton).

q, k, v: [T, H, D] holding several images back to back (offsets cu_seqlens); each image attends to
itself only, without a mask inside it. Grid (query tile, image, head) over max_seqlen: no host sync
on cu_seqlens, tiles past an image's end return at once.

Head dims that are not a power of two are split, not padded to the next power of two: a main part of
MAIN_DIM columns (the largest power of two <= D) and a tail of D - MAIN_DIM columns held in a
TAIL_PAD-wide tile (>= 16, what tl.dot needs). SigLIP's 72 = 64 + 8 costs 64 + 16 = 80 columns of dot
work instead of 128. The scores are dot(q_main, k_main^T) + dot(q_tail, k_tail^T); the output is two
accumulators, one per part. Tail loads/stores are masked to the real columns: the padding lives in
registers, never in memory. Power-of-two head dims (64, 128) have no tail and no tail code (HAS_TAIL).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_prefill import LOG2E, NEG_BIG, _load_2d, dot_precision, is_interpreter, next_pow2, prefill_config


@triton.jit
def _split_kv_inner(acc_main, acc_tail, l_i, m_i, q_main, q_tail, k_base, v_base, stride_kt, stride_vt,
                    lo, hi, kv_len, qk_scale, offs_n, offs_main, offs_tail,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MAIN_DIM: tl.constexpr,
                    TAIL_PAD: tl.constexpr, HAS_TAIL: tl.constexpr, MASK_N: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """Keys/values [lo, hi) of one image, folded into (acc_main, acc_tail, l_i, m_i) by online softmax.

    Bidirectional: the only mask is key < kv_len, in the last partial block (MASK_N).
    """
    # Column masks only where a tile is wider than its real columns (unmasked loads vectorise).
    MASK_MAIN: tl.constexpr = HEAD_DIM < MAIN_DIM           # D < 16: the main tile itself is padded
    MASK_TAIL: tl.constexpr = HEAD_DIM - MAIN_DIM < TAIL_PAD
    main_mask = offs_main < HEAD_DIM
    tail_mask = MAIN_DIM + offs_tail < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + offs_n
        n_mask = keys < kv_len
        k_rows = k_base + keys[:, None] * stride_kt
        v_rows = v_base + keys[:, None] * stride_vt
        # All loads first (V's too, as the paged kernels do), so they are in flight during the QK dots.
        k_main = _load_2d(k_rows + offs_main[None, :], n_mask, main_mask, MASK_N, MASK_MAIN).to(q_main.dtype)
        v_main = _load_2d(v_rows + offs_main[None, :], n_mask, main_mask, MASK_N, MASK_MAIN).to(q_main.dtype)
        if HAS_TAIL:
            k_tail = _load_2d(k_rows + MAIN_DIM + offs_tail[None, :], n_mask, tail_mask, MASK_N,
                              MASK_TAIL).to(q_main.dtype)
            v_tail = _load_2d(v_rows + MAIN_DIM + offs_tail[None, :], n_mask, tail_mask, MASK_N,
                              MASK_TAIL).to(q_main.dtype)
        qk = tl.dot(q_main, tl.trans(k_main), input_precision=DOT_PREC)
        if HAS_TAIL:
            qk = tl.dot(q_tail, tl.trans(k_tail), qk, input_precision=DOT_PREC)  # accumulates onto the main scores
        qk = qk * qk_scale
        if MASK_N:
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        # The PV dots run in the input dtype (fp16/bf16 tensor cores), accumulating in fp32.
        p = p.to(q_main.dtype)
        acc_main = tl.dot(p, v_main, acc_main * alpha[:, None], input_precision=DOT_PREC)
        if HAS_TAIL:
            acc_tail = tl.dot(p, v_tail, acc_tail * alpha[:, None], input_precision=DOT_PREC)
    return acc_main, acc_tail, l_i, m_i


@triton.jit
def _varlen_kernel(
        Q, K, V, Out, cu_seqlens,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        qk_scale,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, MAIN_DIM: tl.constexpr, TAIL_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
    HAS_TAIL: tl.constexpr = HEAD_DIM > MAIN_DIM
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP

    start = tl.load(cu_seqlens + seq)
    seq_len = tl.load(cu_seqlens + seq + 1) - start
    m0 = tile * BLOCK_M
    if m0 >= seq_len:  # grid is sized for the longest image
        return

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_main = tl.arange(0, MAIN_DIM)
    offs_tail = tl.arange(0, TAIL_PAD)  # relative to MAIN_DIM
    m_mask = offs_m < seq_len
    main_mask = offs_main < HEAD_DIM
    tail_mask = MAIN_DIM + offs_tail < HEAD_DIM

    q_rows = Q + (start + offs_m)[:, None] * stride_qt + head * stride_qh
    q_main = tl.load(q_rows + offs_main[None, :], mask=m_mask[:, None] & main_mask[None, :], other=0.0)
    # Without a tail, q_tail/acc_tail are never read and compile away.
    q_tail = tl.zeros([BLOCK_M, TAIL_PAD], dtype=q_main.dtype)
    if HAS_TAIL:
        q_tail = tl.load(q_rows + MAIN_DIM + offs_tail[None, :], mask=m_mask[:, None] & tail_mask[None, :],
                         other=0.0)

    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_main = tl.zeros([BLOCK_M, MAIN_DIM], dtype=tl.float32)
    acc_tail = tl.zeros([BLOCK_M, TAIL_PAD], dtype=tl.float32)

    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh
    full_hi = (seq_len // BLOCK_N) * BLOCK_N
    acc_main, acc_tail, l_i, m_i = _split_kv_inner(
        acc_main, acc_tail, l_i, m_i, q_main, q_tail, k_base, v_base, stride_kt, stride_vt,
        0, full_hi, seq_len, qk_scale, offs_n, offs_main, offs_tail,
        BLOCK_N, HEAD_DIM, MAIN_DIM, TAIL_PAD, HAS_TAIL, False, DOT_PREC)
    acc_main, acc_tail, l_i, m_i = _split_kv_inner(
        acc_main, acc_tail, l_i, m_i, q_main, q_tail, k_base, v_base, stride_kt, stride_vt,
        full_hi, seq_len, seq_len, qk_scale, offs_n, offs_main, offs_tail,
        BLOCK_N, HEAD_DIM, MAIN_DIM, TAIL_PAD, HAS_TAIL, True, DOT_PREC)

    o_rows = Out + (start + offs_m)[:, None] * stride_ot + head * stride_oh
    out_main = acc_main / l_i[:, None]
    tl.store(o_rows + offs_main[None, :], out_main.to(Out.dtype.element_ty),
             mask=m_mask[:, None] & main_mask[None, :])
    if HAS_TAIL:
        out_tail = acc_tail / l_i[:, None]
        tl.store(o_rows + MAIN_DIM + offs_tail[None, :], out_tail.to(Out.dtype.element_ty),
                 mask=m_mask[:, None] & tail_mask[None, :])


def split_head_dim(d: int) -> tuple[int, int]:
    """(MAIN_DIM, TAIL_PAD): the main tile is the largest power of two <= d (at least 16, the smallest
    tl.dot operand); the rest, if any, goes to a tail tile of the next power of two >= 16."""
    main = max(16, next_pow2(d + 1) // 2)
    tail = d - main
    return main, (max(16, next_pow2(tail)) if tail > 0 else 16)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float, *, out: torch.Tensor | None = None,
                     block_m: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Bidirectional attention within each packed sequence (validated by the backend). k/v may have
    fewer heads than q (GQA) though the ViT uses H for all three. `out` (q's shape, last dim contiguous;
    a view into a wider buffer is fine) receives the result, otherwise a new tensor does."""
    t, h, d = q.shape
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be like q {tuple(q.shape)} {q.dtype} with a contiguous last dim, got "
                         f"{tuple(out.shape)} {out.dtype} strides {tuple(out.stride())}")
    num_seqs = cu_seqlens.numel() - 1
    if t == 0 or num_seqs <= 0 or max_seqlen <= 0:
        return out
    main_dim, tail_pad = split_head_dim(d)
    dot_width = main_dim + (tail_pad if d > main_dim else 0)  # 80 for d = 72
    cfg = prefill_config(dot_width, is_interpreter(q), q.element_size())
    block_m = block_m or cfg["BLOCK_M"]
    block_n = block_n or cfg["BLOCK_N"]
    if block_m < 16 or block_n < 16:
        raise ValueError(f"need BLOCK_M, BLOCK_N >= 16, got {block_m}, {block_n}")
    grid = (triton.cdiv(max_seqlen, block_m), num_seqs, h)
    _varlen_kernel[grid](
        q, k, v, out, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E,
        GROUP=h // k.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, MAIN_DIM=main_dim, TAIL_PAD=tail_pad,
        DOT_PREC=dot_precision(q.dtype),
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out


__all__ = ["varlen_attention", "split_head_dim"]
