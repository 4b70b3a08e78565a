"""The ViT's packed bidirectional varlen attention (Triton).

q, k, v: [T, H, D] holding several images back to back (offsets cu_seqlens); each image attends to
itself only, without a mask inside it. Grid (query tile, image, head) over max_seqlen: no host sync
on cu_seqlens, tiles past an image's end return at once. SigLIP's head_dim 72 is padded to 128
inside the kernel (masked loads/stores), never in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_prefill import (LOG2E, NEG_BIG, _dense_kv_inner, dot_precision, is_interpreter, next_pow2,
                            prefill_config)


@triton.jit
def _varlen_kernel(
        Q, K, V, Out, cu_seqlens,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        qk_scale,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
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
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_mask = offs_m < seq_len
    d_mask = offs_d < HEAD_DIM

    q_ptrs = Q + (start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    not_causal = seq_len * 0  # a run-time 0: bidirectional inside the image
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh
    full_hi = (seq_len // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _dense_kv_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                    0, full_hi, seq_len, not_causal, qk_scale, offs_m, offs_n, offs_d,
                                    BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, DOT_PREC)
    acc, l_i, m_i = _dense_kv_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                    full_hi, seq_len, seq_len, not_causal, qk_scale, offs_m, offs_n, offs_d,
                                    BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, DOT_PREC)

    out = acc / l_i[:, None]
    o_ptrs = Out + (start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float, *, block_m: int | None = None, block_n: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Bidirectional attention within each packed sequence (validated by the backend). k/v may have
    fewer heads than q (GQA) though the ViT uses H for all three."""
    t, h, d = q.shape
    out = torch.empty_like(q)
    num_seqs = cu_seqlens.numel() - 1
    if t == 0 or num_seqs <= 0 or max_seqlen <= 0:
        return out
    d_pad = max(16, next_pow2(d))
    cfg = prefill_config(d_pad, is_interpreter(q), q.element_size())
    block_m = block_m or cfg["BLOCK_M"]
    block_n = block_n or cfg["BLOCK_N"]
    if block_m < 16 or block_n < 16:
        raise ValueError(f"need BLOCK_M, BLOCK_N >= 16, got {block_m}, {block_n}")
    grid = (triton.cdiv(max_seqlen, block_m), num_seqs, h)
    _varlen_kernel[grid](
        q, k, v, out, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E,
        GROUP=h // k.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, HEAD_DIM_PAD=d_pad,
        DOT_PREC=dot_precision(q.dtype),
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out


__all__ = ["varlen_attention"]
