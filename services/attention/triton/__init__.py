"""The `triton` attention backend: Triton kernels over the paged KV cache, and the ViT's varlen kernel.

* backend.py        TritonBackend: shape/dtype/device checks, then dispatch to a kernel
* batch.py          TritonBatch: the per-batch index tensors and launch schedule the kernels read
* paged_prefill.py  packed prefill / denoise over a paged prefix
* paged_decode.py   one new token per sequence, split-K over long contexts
* varlen.py         the ViT's packed bidirectional attention

Importing this package imports nothing; its modules import triton. The registry imports backend.py
only when the `triton` backend is asked for.
"""
