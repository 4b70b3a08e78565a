"""The `sdpa` backend: torch scaled_dot_product_attention, the portable, readable reference.

One SDPA call per sequence, its prefix gathered through the block table. It runs everywhere and
every other backend is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.attention.metadata import AttentionMetadata, gather_prefix


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

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        return meta  # nothing to precompute: the host-side lists are all it reads

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
