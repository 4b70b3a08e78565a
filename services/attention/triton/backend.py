"""The `triton` attention backend: shape/dtype checks, then dispatch to the kernels.

* paged_attention: every q_len == 1 -> split-K decode kernel (paged_decode.py); otherwise the packed
  prefill/denoise kernel (paged_prefill.py).
* varlen_attention -> varlen.py.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before
triton and this module are imported). Importing this module without triton raises ImportError, which
the registry reports as BackendUnavailable.
"""

from __future__ import annotations

import dataclasses

import torch

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction
except Exception as e:  # a broken install too: the registry only expects ImportError
    raise ImportError(f"triton attention backend needs triton: {e}") from e

from services.attention.base import BackendUnavailable
from services.attention.metadata import AttentionMetadata

from .batch import TritonBatch, _as_index
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
                       "TRITON_INTERPRET=1 before importing triton / services.attention.triton")


def _check_last_dim_contiguous(names: str, tensors) -> None:
    for n, t in zip(names.split(), tensors):
        if t.stride(-1) != 1:
            raise ValueError(f"triton attention: {n} must be contiguous in its last (head_dim) dimension, "
                             f"got strides {tuple(t.stride())}; call .contiguous() first")


class TritonBackend:
    name = "triton"

    def __init__(self):
        # Fail here, with the fix in the message, not at the first launch deep inside triton.
        if not (torch.cuda.is_available() or kernels_interpreted()):
            raise BackendUnavailable("attention backend 'triton' needs a CUDA GPU, or the Triton interpreter "
                                     "for CPU tensors (TRITON_INTERPRET=1 set before the kernels are first "
                                     "imported); the 'sdpa' backend runs anywhere")

    def prepare(self, meta: AttentionMetadata) -> AttentionMetadata:
        """Check the batch and convert its index tensors once for every layer (on the metadata's device)."""
        batch = TritonBatch.build(meta, meta.block_tables.device)
        return dataclasses.replace(meta, backend_state=batch)

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
        batch = TritonBatch.of(meta, q.device)
        if batch.total_q != tq:
            raise ValueError(f"triton attention: meta describes {batch.total_q} new tokens in {batch.num_seqs} "
                             f"sequences, q has {tq}")
        if tq == 0:
            return torch.empty_like(q)
        if batch.decode:
            return paged_decode(q, k_new, v_new, k_cache, v_cache, batch, scale)
        return paged_prefill(q, k_new, v_new, k_cache, v_cache, batch, scale)

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

