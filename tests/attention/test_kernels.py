"""Triton attention kernels vs the SDPA reference backend and a slow float64 reference that walks
the block table position by position.

CPU: the kernels run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1), in fp32,
on small shapes. Tolerance fp32: atol = rtol = 2e-3 (observed errors ~1e-6; the bound leaves room
for tf32-free GPU fp32 runs). On a CUDA machine with TRITON_INTERPRET=0 the same tests run compiled
on the GPU, plus bf16/fp16 tests (tolerance atol = rtol = 3e-2 against an fp32 reference).

Unused cache slots and blocks are filled with NaN: a kernel that reads a position it must not
(past a prefix's end, another sequence's block, the padded head_dim) produces NaN and fails.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from services.attention import AttentionMetadata, SDPABackend, get_backend
from services.attention.triton import backend as triton_backend
from services.attention.triton.batch import TritonBatch
from services.attention.triton.paged_decode import choose_partition, paged_decode
from services.attention.triton.paged_prefill import build_tile_map, paged_prefill, prefill_flops
from services.attention.triton.varlen import split_head_dim, varlen_attention

# The interpreter's own numpy calls warn about array-to-scalar conversion; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

INTERPRETED = triton_backend.kernels_interpreted()
DEVICE = "cpu" if INTERPRETED else "cuda"
ATOL = RTOL = 2e-3          # fp32
ATOL_LP = RTOL_LP = 3e-2    # bf16 / fp16 (GPU only)

TRITON = triton_backend.TritonBackend()
SDPA = SDPABackend()


# ---- inputs ------------------------------------------------------------------------------------------
def make_batch(q_lens, ctx_lens, causal, hq, hkv, d, page, *, seed, dtype=torch.float32, device=DEVICE):
    """Random q/k_new/v_new and a paged cache whose blocks are shuffled (non-contiguous) per sequence;
    every slot not holding a cached token is NaN."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    nblk = [-(-c // page) for c in ctx_lens]
    num_blocks = sum(nblk) + 3  # spare blocks stay NaN
    k_cache = torch.full((num_blocks, page, hkv, d), float("nan"))
    v_cache = torch.full((num_blocks, page, hkv, d), float("nan"))
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    table = torch.zeros((len(q_lens), max([1, *nblk]) + 1), dtype=torch.int32)  # one spare column, 0-padded
    for i, (c, n) in enumerate(zip(ctx_lens, nblk)):
        mine, ids = ids[:n], ids[n:]
        table[i, :n] = torch.tensor(mine, dtype=torch.int32)
        for pos in range(c):
            b, s = mine[pos // page], pos % page
            k_cache[b, s] = torch.randn(hkv, d, generator=g)
            v_cache[b, s] = torch.randn(hkv, d, generator=g)
    t = sum(q_lens)
    q = torch.randn(t, hq, d, generator=g)
    k_new = torch.randn(t, hkv, d, generator=g)
    v_new = torch.randn(t, hkv, d, generator=g)
    to = dict(device=device, dtype=dtype)
    meta = AttentionMetadata.build(q_lens, ctx_lens, causal, table.to(device), page)
    return q.to(**to), k_new.to(**to), v_new.to(**to), k_cache.to(**to), v_cache.to(**to), meta


def naive_paged_reference(q, k_new, v_new, k_cache, v_cache, meta, scale):
    """float64, one (sequence, head) at a time, the prefix read by walking the block table."""
    q, k_new, v_new = q.double().cpu(), k_new.double().cpu(), v_new.double().cpu()
    k_cache, v_cache = k_cache.double().cpu(), v_cache.double().cpu()
    table = meta.block_tables.cpu()
    page = meta.block_size
    hq, hkv = q.shape[1], k_new.shape[1]
    out = torch.zeros_like(q)
    cu = meta.cu_q.tolist()
    for i in range(meta.num_seqs):
        s, e, c = cu[i], cu[i + 1], meta.ctx_lens[i]
        n = e - s
        if n == 0:
            continue
        slots = [(int(table[i, p // page]), p % page) for p in range(c)]
        k_old = torch.stack([k_cache[b, o] for b, o in slots]) if slots else k_new.new_zeros(0, hkv, q.shape[2])
        v_old = torch.stack([v_cache[b, o] for b, o in slots]) if slots else v_new.new_zeros(0, hkv, q.shape[2])
        k = torch.cat([k_old, k_new[s:e]])
        v = torch.cat([v_old, v_new[s:e]])
        allowed = torch.ones(n, c + n, dtype=torch.bool)
        if meta.causal[i]:
            allowed[:, c:] = torch.ones(n, n, dtype=torch.bool).tril()
        for h in range(hq):
            kv = h // (hq // hkv)
            scores = (q[s:e, h] @ k[:, kv].T) * scale
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[s:e, h] = torch.softmax(scores, -1) @ v[:, kv]
    return out


def assert_close(out, ref, atol=ATOL, rtol=RTOL, what=""):
    out, ref = out.float().cpu(), ref.float().cpu()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    assert torch.allclose(out, ref, atol=atol, rtol=rtol), f"{what}: max abs err {err:.3e}"


def check_paged(q_lens, ctx_lens, causal, hq, hkv, d, page, seed, naive=True, **kernel_kw):
    q, kn, vn, kc, vc, meta = make_batch(q_lens, ctx_lens, causal, hq, hkv, d, page, seed=seed)
    scale = 1.0 / math.sqrt(d)
    if kernel_kw:
        fn = paged_decode if all(n == 1 for n in q_lens) else paged_prefill
        out = fn(q, kn, vn, kc, vc, meta, scale, **kernel_kw)
    else:
        out = TRITON.paged_attention(q, kn, vn, kc, vc, meta, scale)
    ref = SDPA.paged_attention(q, kn, vn, kc, vc, meta, scale)
    assert_close(out, ref, what=f"vs sdpa q_lens={q_lens} ctx={ctx_lens} causal={causal} hq={hq} hkv={hkv} d={d}")
    if naive:
        assert_close(out, naive_paged_reference(q, kn, vn, kc, vc, meta, scale), what="vs naive")
    return out


# ---- prefill / denoise -------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("ratio", [1, 4, 7])
def test_prefill_random_batches(ratio, head_dim):
    """Three sequences, random modes, q_len in 1..17 plus one multi-tile sequence, one empty prefix."""
    seed = 1000 * ratio + head_dim
    rng = random.Random(seed)
    hkv = 2 if ratio == 1 else 1
    page = rng.choice([8, 16, 32])
    q_lens = [rng.randint(1, 17), rng.randint(1, 17), rng.randint(33, 45)]
    ctx_lens = [0, rng.randint(1, 70), rng.randint(1, 70)]
    causal = [rng.random() < 0.5, True, False]
    order = list(range(3))
    rng.shuffle(order)
    # ratio 4 calls the kernel directly with per-page table lookups; the others go through the backend.
    kw = dict(page_tiles=True) if ratio == 4 else {}
    check_paged([q_lens[i] for i in order], [ctx_lens[i] for i in order], [causal[i] for i in order],
                ratio * hkv, hkv, head_dim, page, seed, **kw)


@pytest.mark.parametrize("mode", ["causal", "bidirectional", "mixed"])
def test_prefill_every_new_block_length(mode):
    """q_len 1..17 (one per sequence: every remainder modulo BLOCK 16, and 16 + 1), random prefixes."""
    rng = random.Random(7)
    q_lens = list(range(1, 18))
    ctx_lens = [rng.choice([0, rng.randint(1, 40)]) for _ in q_lens]
    causal = {"causal": [True] * 17, "bidirectional": [False] * 17,
              "mixed": [rng.random() < 0.5 for _ in q_lens]}[mode]
    check_paged(q_lens, ctx_lens, causal, 4, 1, 64, 16, seed=len(mode), naive=False)


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_empty_cache(causal):
    check_paged([19, 5, 34], [0, 0, 0], [causal, not causal, causal], 7, 1, 72, 16, seed=3)


@pytest.mark.parametrize("page_tiles", [True, False])
def test_prefill_block_sizes_and_long_prefix(page_tiles):
    """BLOCK_M 32 > BLOCK_N 16 (several diagonal blocks per tile), prefix over many 8-token pages, table
    looked up per page (two pages per BLOCK_N) or per position."""
    check_paged([50, 3], [131, 64], [True, False], 4, 2, 64, 8, seed=11, block_m=32, block_n=16,
                page_tiles=page_tiles)


def test_prefill_page_larger_than_block_n():
    """32-token pages, BLOCK_N 16: two key blocks per page (per-position table lookups)."""
    check_paged([20, 35], [77, 32], [False, True], 4, 1, 64, 32, seed=12, block_m=16, block_n=16)


def test_prefill_tile_map_and_flops():
    seq, m0 = build_tile_map([40, 3], [5, 100], [True, False], 16, "cpu")
    tiles = sorted(zip(seq.tolist(), m0.tolist()))
    assert tiles == [(0, 0), (0, 16), (0, 32), (1, 0)]
    assert seq.tolist()[0] == 1  # the long-prefix tile has the most work and goes first
    assert prefill_flops([4, 2], [10, 0], [True, False], 2, 8) == 4.0 * (4 * 10 + 8 + 4) * 2 * 8


# ---- decode ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("ratio", [1, 4, 7])
def test_decode_split_partitions(ratio, head_dim):
    """partition 32 positions: the long sequences span 3..5 partitions, short ones leave some empty."""
    rng = random.Random(ratio * 7 + head_dim)
    hkv = 2 if ratio == 1 else 1
    ctx_lens = [0, 1, rng.randint(17, 60), rng.randint(100, 150)]
    page = rng.choice([8, 16, 32])
    check_paged([1] * 4, ctx_lens, [True, False, True, False], ratio * hkv, hkv, head_dim, page,
                seed=ratio + head_dim, partition_size=32, block_n=16, page_tiles=head_dim != 72)


def test_decode_default_split_heuristic_through_backend():
    """Backend dispatch (every q_len == 1) with the host's own split choice."""
    ctx_lens = [300, 45, 0]
    part, splits = choose_partition(3, 1, 300, 16, 4)
    assert splits * part >= 300 and part % 16 == 0
    check_paged([1, 1, 1], ctx_lens, [True] * 3, 4, 1, 64, 16, seed=5, naive=False)


def test_decode_matches_prefill_kernel():
    """q_len == 1 through the prefill kernel and through the split-K decode kernel agree."""
    q, kn, vn, kc, vc, meta = make_batch([1, 1], [70, 33], [True, False], 4, 1, 64, 16, seed=9)
    a = paged_decode(q, kn, vn, kc, vc, meta, 0.125, partition_size=16, block_n=16)
    b = paged_prefill(q, kn, vn, kc, vc, meta, 0.125)
    assert_close(a, b, what="decode vs prefill kernel")
    assert_close(a, SDPA.paged_attention(q, kn, vn, kc, vc, meta, 0.125), what="decode vs sdpa")


# ---- ViT varlen --------------------------------------------------------------------------------------
# Head dims by how the kernel splits them (main + tail tile): 64 / 128 no tail; 72 = 64 + 8 in a 16-wide
# tail (SigLIP); 40 = 32 + 8; 80 = 64 + 16 (tail tile exactly full, unmasked); 96 = 64 + 32; 8 < 16: a
# padded main tile and no tail.
@pytest.mark.parametrize("head_dim", [8, 40, 64, 72, 80, 96, 128])
def test_varlen_vs_sdpa(head_dim):
    g = torch.Generator().manual_seed(head_dim)
    lens = [1, 16, 17, 40]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(sum(lens), 3, head_dim, generator=g).to(DEVICE) for _ in range(3))
    scale = head_dim ** -0.5
    out = TRITON.varlen_attention(q, k, v, cu, max(lens), scale)
    assert_close(out, SDPA.varlen_attention(q, k, v, cu, max(lens), scale), what=f"varlen d={head_dim}")


def test_varlen_head_dim_split():
    assert split_head_dim(72) == (64, 16)   # 80 columns of dot work instead of 128
    assert split_head_dim(40) == (32, 16)
    assert split_head_dim(80) == (64, 16)
    assert split_head_dim(96) == (64, 32)
    assert split_head_dim(64)[0] == 64 and split_head_dim(128)[0] == 128  # no tail
    assert split_head_dim(8)[0] == 16


@pytest.mark.parametrize("head_dim, hq, hkv, block_m, block_n", [
    (72, 4, 2, None, None), (40, 2, 2, 32, 16), (96, 2, 1, 16, 32), (80, 2, 2, 16, 16), (8, 2, 2, None, None)])
def test_varlen_reads_and_writes_only_the_head_dim(head_dim, hq, hkv, block_m, block_n):
    """q/k/v are views into wider NaN buffers: every head row is followed by NaN columns (where a tail or
    a padded main tile would over-read) and the tokens by NaN rows. The output is a view into a wider
    buffer whose extra columns must keep their sentinel (a tail store past the head dim would change
    them). GQA and non-default blocks on some cases."""
    g = torch.Generator().manual_seed(head_dim + hq)
    lens = [5, 33, 16]
    t, extra = sum(lens), 16  # extra >= the widest over-read (72: 8 columns; 8: 8 columns)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    def nan_padded(h):
        wide = torch.full((t + 32, h, head_dim + extra), float("nan"))
        wide[:t, :, :head_dim] = torch.randn(t, h, head_dim, generator=g)
        return wide.to(DEVICE)[:t, :, :head_dim]

    q, k, v = nan_padded(hq), nan_padded(hkv), nan_padded(hkv)
    assert q.stride(1) == head_dim + extra
    sentinel = 1234.5
    out_buf = torch.full((t, hq, head_dim + extra), sentinel, device=DEVICE)
    out = varlen_attention(q, k, v, cu, max(lens), head_dim ** -0.5, out=out_buf[..., :head_dim],
                           block_m=block_m, block_n=block_n)
    rep = hq // hkv
    ref = SDPA.varlen_attention(q.contiguous(), k.repeat_interleave(rep, 1).contiguous(),
                                v.repeat_interleave(rep, 1).contiguous(), cu, max(lens), head_dim ** -0.5)
    assert_close(out, ref, what=f"strided varlen d={head_dim}")  # also asserts no NaN came in
    assert (out_buf[..., head_dim:] == sentinel).all(), "store past the head dim"


# ---- backend plumbing --------------------------------------------------------------------------------
def test_backend_registry_strided_inputs_and_errors():
    be = get_backend("triton")
    assert be.name == "triton"
    # q, k, v as views of one fused qkv projection: token stride > Hq * D, last dim contiguous.
    q_lens, ctx_lens, causal = [9, 20], [13, 0], [True, False]
    _, _, _, kc, vc, meta = make_batch(q_lens, ctx_lens, causal, 4, 2, 64, 16, seed=21)
    qkv = torch.randn(sum(q_lens), 8, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    q, kn, vn = qkv.split([4, 2, 2], dim=1)
    assert not q.is_contiguous()
    out = be.paged_attention(q, kn, vn, kc, vc, meta, 0.125)
    assert_close(out, SDPA.paged_attention(q, kn, vn, kc, vc, meta, 0.125), what="strided qkv")
    # int64 block tables are accepted (converted), results unchanged.
    meta64 = AttentionMetadata.build(q_lens, ctx_lens, causal, meta.block_tables.long(), 16)
    assert_close(be.paged_attention(q, kn, vn, kc, vc, meta64, 0.125), out, what="int64 table")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        be.paged_attention(qkv[:, :3], kn, vn, kc, vc, meta, 0.125)
    with pytest.raises(ValueError, match="last"):
        be.paged_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kn, vn, kc, vc, meta, 0.125)
    with pytest.raises(TypeError):
        be.paged_attention(q.double(), kn, vn, kc, vc, meta, 0.125)
    with pytest.raises(ValueError, match="new tokens"):
        be.paged_attention(q[:-1], kn[:-1], vn[:-1], kc, vc, meta, 0.125)


def test_prepared_batch_is_built_once_and_metadata_is_never_written():
    """prepare() returns a copy carrying the backend's per-batch state: the same results as an unprepared
    batch, the tile map built once for every layer, and no call writes into a metadata object."""
    q, kn, vn, kc, vc, meta = make_batch([9, 20], [13, 0], [True, False], 4, 2, 64, 16, seed=31)
    before = dict(vars(meta))
    prepared = TRITON.prepare(meta)
    state = prepared.backend_state
    assert prepared is not meta and meta.backend_state is None
    assert isinstance(state, TritonBatch) and not state.decode and state.total_q == 29
    out = TRITON.paged_attention(q, kn, vn, kc, vc, prepared, 0.125)
    (tile_map,) = state.tile_maps.values()
    out_again = TRITON.paged_attention(q, kn, vn, kc, vc, prepared, 0.125)  # the next layer
    assert prepared.backend_state is state and next(iter(state.tile_maps.values())) is tile_map
    assert torch.equal(out, out_again)
    assert_close(TRITON.paged_attention(q, kn, vn, kc, vc, meta, 0.125), out, what="unprepared")
    assert_close(SDPA.paged_attention(q, kn, vn, kc, vc, prepared, 0.125), out, what="sdpa, prepared meta")
    assert vars(meta).keys() == before.keys() and all(vars(meta)[k] is v for k, v in before.items())
    decode = TRITON.prepare(make_batch([1, 1], [40, 3], [True, True], 4, 2, 64, 16, seed=32)[-1])
    assert decode.backend_state.decode


# ---- GPU only: half precision at model-like head counts ----------------------------------------------
gpu_only = pytest.mark.skipif(INTERPRETED, reason="compiled kernels on a CUDA GPU only (TRITON_INTERPRET=0)")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_denoise_prefill_decode(dtype):
    def run(q_lens, ctx_lens, causal, seed):
        q, kn, vn, kc, vc, meta = make_batch(q_lens, ctx_lens, causal, 28, 4, 128, 16, seed=seed, dtype=dtype)
        out = TRITON.paged_attention(q, kn, vn, kc, vc, meta, 128 ** -0.5)
        ref = SDPA.paged_attention(q.float(), kn.float(), vn.float(), kc.float(), vc.float(), meta, 128 ** -0.5)
        assert out.dtype == dtype
        assert_close(out, ref, ATOL_LP, RTOL_LP, what=f"{dtype} {q_lens} {ctx_lens}")

    run([300, 300, 300], [700, 500, 0], [False, False, False], 1)   # CFG denoise branches
    run([257, 1, 77], [1000, 30, 0], [True, True, False], 2)        # mixed prefill
    run([1] * 5, [5000, 1, 0, 333, 2048], [True] * 5, 3)           # decode, many partitions


@gpu_only
@pytest.mark.parametrize("head_dim", [72, 64, 96])  # SigLIP's split 64 + 8, no tail, a 32-wide tail
def test_gpu_varlen_vit_shapes_bf16(head_dim):
    lens = [1024, 576, 4900 - 1600]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lens), 16, head_dim, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out = TRITON.varlen_attention(q, k, v, cu, max(lens), head_dim ** -0.5)
    ref = SDPA.varlen_attention(q.float(), k.float(), v.float(), cu, max(lens), head_dim ** -0.5)
    assert_close(out, ref, ATOL_LP, RTOL_LP, what=f"vit varlen bf16 d={head_dim}")
