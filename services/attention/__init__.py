"""Attention behind one interface: per-batch metadata, backends, and one registry that picks a backend.

Two operations cover every attention in BAGEL:

* `paged_attention`: a batch of sequences, each = a cached prefix (read through its block table)
  + a block of new tokens. Inside the new block attention is causal (text) or bidirectional (an
  image block); every new token sees the whole cached prefix. GQA: query head h reads KV head
  h // (num_q_heads // num_kv_heads). The new tokens' K/V are passed explicitly (whether or not the
  caller also wrote them to the cache), so a denoising step reads its context without writing to it.
* `varlen_attention`: the ViT's packed bidirectional attention over several images.

Layout:
* metadata.py   AttentionMetadata (one packed batch) and gather_prefix (the paged cache layout)
* base.py       the AttentionBackend interface, BackendUnavailable
* registry.py   name -> implementation, imported on first use; get_backend() picks one
* sdpa.py       `sdpa`: torch scaled_dot_product_attention, the portable reference
* triton/       `triton`: Triton kernels (paged prefill/denoise, split-K decode, the ViT's varlen)
                and their backend class; the default on CUDA

This package imports no other part of the project: the LLM and the ViT both use it.
"""

from services.attention.base import AttentionBackend, BackendUnavailable
from services.attention.metadata import AttentionMetadata, gather_prefix
from services.attention.registry import BACKENDS, BackendSpec, backend_names, default_backend_name, get_backend
from services.attention.sdpa import SDPABackend

__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "BackendSpec", "BackendUnavailable", "SDPABackend",
           "backend_names", "default_backend_name", "gather_prefix", "get_backend"]
