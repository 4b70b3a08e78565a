"""The `triton` attention backend: shape/dtype checks, then dispatch to the kernels.

* paged_attention: every q_len == 1 -> split-K decode kernel (paged_decode.py); otherwise the packed
  prefill/denoise kernel (paged_prefill.py).
* varlen_attention -> varlen.py.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before
triton and this module are imported). Importing this module without triton raises ImportError, which
the registry in services/llm/attention.py treats as "backend not available".
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction
except Exception as e:  # a broken install too: the registry only skips on ImportError
    raise ImportError(f"triton attention backend needs triton: {e}") from e

from services.llm.attention import AttentionMetadata, register_backend

from .paged_decode import paged_decode
from .paged_prefill import _paged_prefill_kernel, paged_prefill
from .varlen import varlen_attention as _varlen

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def kernels_interpreted() -> bool:
    """True when the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at their import)."""
    return isinstance(_paged_prefill_kernel, InterpretedFunction)


def _check_device(device: torch.device, others) -> None:
    for t in others:
        if t.device != device:
            raise ValueError(f"triton attention: all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda" or kernels_interpreted():
        return  # (the interpreter also takes CUDA tensors: it copies them to the host, slow but correct)
    raise RuntimeError(f"triton attention on {device} tensors needs the Triton interpreter: set "
                       "TRITON_INTERPRET=1 before importing triton / services.llm.kernels")


def _check_last_dim_contiguous(names: str, tensors) -> None:
    for n, t in zip(names.split(), tensors):
        if t.stride(-1) != 1:
            raise ValueError(f"triton attention: {n} must be contiguous in its last (head_dim) dimension, "
                             f"got strides {tuple(t.stride())}; call .contiguous() first")


def _as_index(t: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """Small int32 metadata tensors: converted (cheap) rather than rejected."""
    if t.device != device:
        raise ValueError(f"triton attention: meta.{name} is on {t.device}, the tensors on {device}")
    if t.dtype != torch.int32 or not t.is_contiguous():
        t = t.to(torch.int32).contiguous()
    return t


class _KernelMeta:
    """What the kernels read from an AttentionMetadata: its index tensors as contiguous int32 on the
    compute device, checked once. Cached on the metadata object (one batch's metadata serves every
    layer), so the metadata must not be mutated after its first use; the prefill tile map is cached
    alongside."""

    def __init__(self, meta: AttentionMetadata, device: torch.device):
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
        self.device = device
        self.q_lens, self.ctx_lens, self.causal = meta.q_lens, meta.ctx_lens, meta.causal
        self.block_size = meta.block_size
        self.total_q = sum(meta.q_lens)
        self.decode = b > 0 and all(n == 1 for n in meta.q_lens)
        self.cu_q = _as_index(meta.cu_q, "cu_q", device)
        self.ctx_lens_t = _as_index(meta.ctx_lens_t, "ctx_lens_t", device)
        self.causal_t = _as_index(meta.causal_t, "causal_t", device)
        self.block_tables = _as_index(meta.block_tables, "block_tables", device)
        self._triton_tile_maps: dict = {}

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @staticmethod
    def of(meta: AttentionMetadata, device: torch.device) -> "_KernelMeta":
        km = meta.__dict__.get("_triton_kernel_meta")
        if km is None or km.device != device:
            km = _KernelMeta(meta, device)
            meta.__dict__["_triton_kernel_meta"] = km
        return km


class TritonBackend:
    name = "triton"

    def paged_attention(self, q, k_new, v_new, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        if q.dim() != 3 or k_new.dim() != 3 or v_new.dim() != 3:
            raise ValueError(f"triton attention: q, k_new, v_new must be [T, H, D], got {tuple(q.shape)}, "
                             f"{tuple(k_new.shape)}, {tuple(v_new.shape)}")
        tq, hq, d = q.shape
        hkv = k_new.shape[1]
        if k_new.shape != (tq, hkv, d) or v_new.shape != k_new.shape:
            raise ValueError(f"triton attention: k_new/v_new must be [{tq}, Hkv, {d}], got {tuple(k_new.shape)}, "
                             f"{tuple(v_new.shape)}")
        if hkv == 0 or hq % hkv:
            raise ValueError(f"triton attention: num_q_heads {hq} is not a multiple of num_kv_heads {hkv}")
        if k_cache.dim() != 4 or k_cache.shape[2:] != (hkv, d) or v_cache.shape != k_cache.shape:
            raise ValueError(f"triton attention: k_cache/v_cache must be [num_blocks, block_size, {hkv}, {d}], "
                             f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
        if k_cache.shape[1] != meta.block_size:
            raise ValueError(f"triton attention: cache block size {k_cache.shape[1]} != meta.block_size "
                             f"{meta.block_size}")
        if not 0 < d <= MAX_HEAD_DIM:
            raise ValueError(f"triton attention: head_dim {d} not in 1..{MAX_HEAD_DIM}")
        if q.dtype not in _FLOAT_DTYPES or k_new.dtype != q.dtype or v_new.dtype != q.dtype:
            raise TypeError(f"triton attention: q, k_new, v_new must share one of {_FLOAT_DTYPES}, got "
                            f"{q.dtype}, {k_new.dtype}, {v_new.dtype}")
        if k_cache.dtype not in _FLOAT_DTYPES or v_cache.dtype != k_cache.dtype:
            raise TypeError(f"triton attention: k_cache/v_cache must share a float dtype, got {k_cache.dtype}, "
                            f"{v_cache.dtype}")
        _check_device(q.device, (k_new, v_new, k_cache, v_cache))
        _check_last_dim_contiguous("q k_new v_new k_cache v_cache", (q, k_new, v_new, k_cache, v_cache))
        km = _KernelMeta.of(meta, q.device)
        if km.total_q != tq:
            raise ValueError(f"triton attention: meta describes {km.total_q} new tokens in {km.num_seqs} "
                             f"sequences, q has {tq}")
        if tq == 0:
            return torch.empty_like(q)
        if km.decode:
            return paged_decode(q, k_new, v_new, k_cache, v_cache, km, scale)
        return paged_prefill(q, k_new, v_new, k_cache, v_cache, km, scale)

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen, scale):
        if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
            raise ValueError(f"triton varlen attention: q, k, v must be [T, H, D] (k/v may have fewer heads), got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ValueError(f"triton varlen attention: {q.shape[1]} q heads is not a multiple of {k.shape[1]}")
        if not 0 < q.shape[2] <= MAX_HEAD_DIM:
            raise ValueError(f"triton varlen attention: head_dim {q.shape[2]} not in 1..{MAX_HEAD_DIM}")
        if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"triton varlen attention: q, k, v must share one of {_FLOAT_DTYPES}, got {q.dtype}, "
                            f"{k.dtype}, {v.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"triton varlen attention: cu_seqlens must be [num_seqs + 1], got "
                             f"{tuple(cu_seqlens.shape)}")
        _check_device(q.device, (k, v))
        _check_last_dim_contiguous("q k v", (q, k, v))
        cu = _as_index(cu_seqlens, "cu_seqlens", q.device)
        return _varlen(q, k, v, cu, int(max_seqlen), scale)


register_backend("triton", TritonBackend)
