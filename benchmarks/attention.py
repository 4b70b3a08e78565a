"""Attention benchmark: Triton kernels vs torch SDPA (vs flash-attn when importable) at BAGEL-7B shapes.

flash-attn is not one of the project's attention backends (services/attention has `sdpa` and `triton`):
here it is an external baseline, timed only when the flash_attn package happens to be installed.

    python benchmarks/attention.py                       # CUDA, bf16, all cases
    python benchmarks/attention.py --cases decode,vit    # a subset
    python benchmarks/attention.py --device cpu --small  # tiny shapes under the Triton interpreter (smoke)

Backends per case:
  triton     services.attention.triton (paged cache read through block tables)
  sdpa       the reference SDPABackend: one torch SDPA call per sequence, prefix gathered, GQA repeated
  sdpa_best  torch F.scaled_dot_product_attention on contiguous [B, H, L, D] tensors prepared outside
             the timed region (no gather, KV heads pre-expanded): torch's best FLOP rate at that shape
  flash      external baseline: flash_attn_varlen_func (contiguous K/V) / flash_attn_with_kvcache (paged,
             256-token pages); skipped when flash_attn is not importable

FLOPs: 4 * sum_seqs(q_len * k_len_effective) * Hq * D, the new block counted half when causal
(services.attention.triton.paged_prefill.prefill_flops). The ViT case counts its real D = 72, not the
kernel's 64 + 16 dot columns (services.attention.triton.varlen.split_head_dim), so its TFLOP/s compare
directly with SDPA's. Decode also reports GB/s: every cached K and V byte read once. Before timing
each case the Triton output is checked against sdpa (max abs error).

Timing: the 'ms' column is triton.testing.do_bench (median, L2 flushed before each call) of the whole
backend call, Python included: at decode sizes that is mostly host overhead. --graph adds the same
call replayed from a CUDA graph (GPU time). --sweep times the kernels alone over launch configs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny shapes (smoke check; required with --device cpu)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="default bf16 on cuda, fp32 on cpu (the interpreter's bf16 dot is not exact)")
    p.add_argument("--cases", default="denoise,prefill,decode,vit",
                   help="comma list of: denoise, prefill, decode, vit")
    p.add_argument("--backends", default="triton,sdpa,sdpa_best,flash")
    p.add_argument("--page", type=int, default=16, help="KV cache block size (tokens)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    p.add_argument("--graph", action="store_true",
                   help="cuda: also time triton and sdpa_best replayed from a CUDA graph (no host overhead; "
                        "no L2 flush either, so inputs under ~50 MB are timed L2-warm)")
    p.add_argument("--sweep", action="store_true",
                   help="cuda: time the Triton kernels over a list of launch configs per case (tuning aid)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.small:
        p.error("--device cpu runs under the Triton interpreter: use it with --small")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernels are imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from services.attention import AttentionMetadata, SDPABackend  # noqa: E402
from services.attention.triton.backend import TritonBackend  # noqa: E402
from services.attention.triton.paged_decode import choose_partition, decode_kv_bytes, paged_decode  # noqa: E402
from services.attention.triton.paged_prefill import paged_prefill, prefill_flops  # noqa: E402
from services.attention.triton.varlen import varlen_attention as triton_varlen  # noqa: E402

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
    FLASH_ERR = None
except Exception as e:  # not installed (the usual case), or built for another torch
    flash_attn_varlen_func = flash_attn_with_kvcache = None
    FLASH_ERR = f"{type(e).__name__}: {e}".splitlines()[0][:80]

try:
    from torch.nn.attention.bias import causal_lower_right
except Exception:  # older torch: a boolean mask instead
    causal_lower_right = None


# ---- shapes --------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    kind: str                      # "paged" or "vit"
    q_lens: list[int] = field(default_factory=list)
    ctx_lens: list[int] = field(default_factory=list)
    causal: list[bool] = field(default_factory=list)
    hq: int = 28
    hkv: int = 4
    d: int = 128
    vit_lens: list[int] = field(default_factory=list)


def build_cases(small: bool, which: set[str]) -> list[Case]:
    cases = []
    if small:
        hq, hkv, d = 4, 1, 64
        if "denoise" in which:
            cases.append(Case("denoise 3x24 q, ctx 40", "paged", [24] * 3, [40] * 3, [False] * 3, hq, hkv, d))
        if "prefill" in which:
            cases.append(Case("prefill 40 causal, ctx 20", "paged", [40], [20], [True], hq, hkv, d))
        if "decode" in which:
            for b in (1, 3):
                cases.append(Case(f"decode B={b} ctx 100", "paged", [1] * b, [100] * b, [True] * b, hq, hkv, d))
        if "vit" in which:
            cases.append(Case("vit 2 images 30+20, H2 D72", "vit", hq=2, hkv=2, d=72, vit_lens=[30, 20]))
        return cases
    # BAGEL-7B (Qwen2-7B LLM): 28 query heads, 4 KV heads, head_dim 128; SigLIP: 16 heads of 72.
    if "denoise" in which:
        for prefix in (1024, 4096, 9216):
            # One denoise step: 4096 latent tokens (64x64), bidirectional, for the three CFG branches.
            cases.append(Case(f"denoise 3x4096 q, ctx {prefix // 1024}k", "paged", [4096] * 3, [prefix] * 3,
                              [False] * 3))
    if "prefill" in which:
        cases.append(Case("prefill 2k causal, ctx 1k", "paged", [2048], [1024], [True]))
        cases.append(Case("prefill 4x1k causal, ctx 0", "paged", [1024] * 4, [0] * 4, [True] * 4))
    if "decode" in which:
        for b in (1, 8):
            for ctx in (1024, 4096, 16384, 32768):
                cases.append(Case(f"decode B={b} ctx {ctx // 1024}k", "paged", [1] * b, [ctx] * b, [True] * b))
    if "vit" in which:
        cases.append(Case("vit 4900 tok, H16 D72", "vit", hq=16, hkv=16, d=72, vit_lens=[4900]))
    return cases


# ---- inputs --------------------------------------------------------------------------------------------
def make_paged_inputs(case: Case, page: int, dtype, device):
    """A pool with each sequence's prefix in shuffled (non-contiguous) blocks, as the cache hands them out."""
    g = torch.Generator(device="cpu").manual_seed(0)
    nblk = [-(-c // page) for c in case.ctx_lens]
    num_blocks = max(1, sum(nblk))
    k_cache = torch.randn(num_blocks, page, case.hkv, case.d, dtype=dtype, device=device)
    v_cache = torch.randn(num_blocks, page, case.hkv, case.d, dtype=dtype, device=device)
    ids = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.zeros(len(case.q_lens), max([1, *nblk]), dtype=torch.int32)
    for i, n in enumerate(nblk):
        table[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    # Prepared for the Triton backend, as the engine does once per forward: the timed calls do not redo
    # the per-batch work (the SDPA backend ignores it).
    meta = TritonBackend().prepare(AttentionMetadata.build(case.q_lens, case.ctx_lens, case.causal,
                                                           table.to(device), page))
    t = sum(case.q_lens)
    q = torch.randn(t, case.hq, case.d, dtype=dtype, device=device)
    k_new = torch.randn(t, case.hkv, case.d, dtype=dtype, device=device)
    v_new = torch.randn(t, case.hkv, case.d, dtype=dtype, device=device)
    return q, k_new, v_new, k_cache, v_cache, meta


def gathered_kv(case: Case, k_new, v_new, k_cache, v_cache, meta):
    """Per sequence: [prefix + new, Hkv, D] contiguous K and V (prepared outside timing)."""
    ks, vs = [], []
    cu = meta.cu_q.tolist()
    page = k_cache.shape[1]
    for i in range(len(case.q_lens)):
        nb = -(-case.ctx_lens[i] // page)
        idx = meta.block_tables[i, :nb].long()
        k_old = k_cache[idx].flatten(0, 1)[:case.ctx_lens[i]]
        v_old = v_cache[idx].flatten(0, 1)[:case.ctx_lens[i]]
        ks.append(torch.cat([k_old, k_new[cu[i]:cu[i + 1]]]))
        vs.append(torch.cat([v_old, v_new[cu[i]:cu[i + 1]]]))
    return ks, vs


def sdpa_best_fn(case: Case, q, k_new, v_new, k_cache, v_cache, meta, scale):
    """torch SDPA on [B, Hq, L, D] contiguous tensors; needs equal lengths across the batch (all our cases)."""
    if len(set(case.q_lens)) != 1 or len(set(case.ctx_lens)) != 1 or len(set(case.causal)) != 1:
        return None, "needs uniform batch"
    b, n, c = len(case.q_lens), case.q_lens[0], case.ctx_lens[0]
    rep = case.hq // case.hkv
    ks, vs = gathered_kv(case, k_new, v_new, k_cache, v_cache, meta)
    qb = q.view(b, n, case.hq, case.d).transpose(1, 2).contiguous()
    kb = torch.stack(ks).repeat_interleave(rep, dim=2).transpose(1, 2).contiguous()
    vb = torch.stack(vs).repeat_interleave(rep, dim=2).transpose(1, 2).contiguous()
    mask = None
    if case.causal[0] and n > 1:
        if causal_lower_right is not None:
            mask = causal_lower_right(n, c + n)  # new token j sees the prefix and new tokens <= j
        else:
            mask = torch.ones(n, c + n, dtype=torch.bool, device=q.device).tril(diagonal=c)
    return (lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)), None


def flash_paged_fn(case: Case, q, k_new, v_new, k_cache, v_cache, meta, scale):
    if flash_attn_varlen_func is None:
        return None, f"flash_attn not importable ({FLASH_ERR})"
    if len(set(case.causal)) != 1:
        return None, "needs one mode per call"
    dev = q.device
    if all(n == 1 for n in case.q_lens):
        # flash_attn_with_kvcache pages must be multiples of 256 tokens: re-page the same prefixes.
        fpage = 256
        ks, vs = gathered_kv(case, k_new, v_new, k_cache, v_cache, meta)
        nblk = [-(-(c + 1) // fpage) for c in case.ctx_lens]
        kc = torch.zeros(sum(nblk), fpage, case.hkv, case.d, dtype=q.dtype, device=dev)
        vc = torch.zeros_like(kc)
        table = torch.zeros(len(nblk), max(nblk), dtype=torch.int32, device=dev)
        at = 0
        for i, n in enumerate(nblk):
            c = case.ctx_lens[i]
            kc[at:at + n].flatten(0, 1)[:c] = ks[i][:c]
            vc[at:at + n].flatten(0, 1)[:c] = vs[i][:c]
            table[i, :n] = torch.arange(at, at + n, dtype=torch.int32, device=dev)
            at += n
        seqlens = torch.tensor(case.ctx_lens, dtype=torch.int32, device=dev)
        q4, k4, v4 = q[:, None], k_new[:, None], v_new[:, None]  # [B, 1, H, D]
        # k/v given: flash appends the new token at cache_seqlens (same slot each call) and attends to it.
        return (lambda: flash_attn_with_kvcache(q4, kc, vc, k=k4, v=v4, cache_seqlens=seqlens, block_table=table,
                                                softmax_scale=scale, causal=True)), None
    ks, vs = gathered_kv(case, k_new, v_new, k_cache, v_cache, meta)
    k, v = torch.cat(ks), torch.cat(vs)
    cu_k = torch.tensor([0, *torch.tensor([x.shape[0] for x in ks]).cumsum(0).tolist()], dtype=torch.int32,
                        device=dev)
    cu_q = meta.cu_q
    max_q, max_k = max(case.q_lens), max(x.shape[0] for x in ks)
    # flash-attn aligns the causal mask bottom-right when k is longer than q: the same rule as ours.
    return (lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale,
                                           causal=case.causal[0])), None


# ---- timing --------------------------------------------------------------------------------------------
def bench(fn: Callable, device: str, warmup_ms: int, rep_ms: int) -> float:
    """Median ms per call. CUDA: triton.testing.do_bench (events, L2 flushed between calls)."""
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def bench_graph(fn: Callable) -> float:
    """Median ms per call replayed from a CUDA graph: GPU time without Python/launch overhead."""
    import triton.testing
    return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


# (BLOCK_M, BLOCK_N, num_warps, num_stages, page_tiles) for prefill/denoise/ViT; decode:
# (partition size relative to the heuristic's, BLOCK_N, num_warps, num_stages, page_tiles). None: default.
PREFILL_SWEEP = [(128, 128, 8, 3, None), (128, 128, 8, 3, True), (128, 64, 8, 3, None), (128, 64, 8, 3, True),
                 (128, 128, 8, 2, None), (64, 64, 4, 3, None), (128, 128, 8, 4, None)]
DECODE_SWEEP = [(1, 64, 4, 3, None), (1, 64, 4, 3, True), (1, 128, 4, 3, None), (1, 32, 4, 3, None),
                (0.5, 64, 4, 3, None), (2, 64, 4, 3, None), (0.25, 64, 4, 3, None)]


def make_vit_inputs(case: Case, dtype, device):
    """Packed q, k, v [T, H, D] of the case's images, cu_seqlens, the longest image, and the FLOPs of the
    real head dim (the kernel's in-register padding is not counted)."""
    t = sum(case.vit_lens)
    q, k, v = (torch.randn(t, case.hq, case.d, dtype=dtype, device=device) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(case.vit_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    flops = 4.0 * sum(n * n for n in case.vit_lens) * case.hq * case.d
    return q, k, v, cu, max(case.vit_lens), flops


def sweep_case(case: Case, args, dtype, device) -> None:
    """Time the Triton kernel itself (CUDA graph) over launch configs, each checked against sdpa."""
    scale = 1.0 / math.sqrt(case.d)
    sdpa_be = SDPABackend()
    if case.kind == "vit":
        q, k, v, cu, mx, flops = make_vit_inputs(case, dtype, device)
        ref = sdpa_be.varlen_attention(q, k, v, cu, mx, scale).float()
        variants = [(f"BM{bm} BN{bn} w{w} s{st}",
                     lambda bm=bm, bn=bn, w=w, st=st: triton_varlen(q, k, v, cu, mx, scale, block_m=bm, block_n=bn,
                                                                    num_warps=w, num_stages=st))
                    for bm, bn, w, st, pt in PREFILL_SWEEP if pt is None]
    else:
        q, k_new, v_new, k_cache, v_cache, meta = make_paged_inputs(case, args.page, dtype, device)
        inputs = (q, k_new, v_new, k_cache, v_cache, meta, scale)
        flops = prefill_flops(case.q_lens, case.ctx_lens, case.causal, case.hq, case.d)
        ref = sdpa_be.paged_attention(*inputs).float()
        if all(n == 1 for n in case.q_lens):
            variants = []
            for f, bn, w, st, pt in DECODE_SWEEP:
                p0, _ = choose_partition(len(case.q_lens), case.hkv, max(case.ctx_lens), bn,
                                         torch.cuda.get_device_properties(0).multi_processor_count)
                part = max(bn, int(p0 * f) // bn * bn)
                variants.append((f"part {part} BN{bn} w{w} s{st} pt{pt}",
                                 lambda part=part, bn=bn, w=w, st=st, pt=pt: paged_decode(
                                     *inputs, partition_size=part, block_n=bn, num_warps=w, num_stages=st,
                                     page_tiles=pt)))
        else:
            variants = [(f"BM{bm} BN{bn} w{w} s{st} pt{pt}",
                         lambda bm=bm, bn=bn, w=w, st=st, pt=pt: paged_prefill(
                             *inputs, block_m=bm, block_n=bn, num_warps=w, num_stages=st, page_tiles=pt))
                        for bm, bn, w, st, pt in PREFILL_SWEEP]
    print(f"[sweep] {case.name}", flush=True)
    for label, fn in variants:
        try:
            err = (fn().float() - ref).abs().max().item()
            ms = bench_graph(fn)
            print(f"  {label:34s} {ms:8.4f} ms  {flops / ms / 1e9:7.1f} TFLOP/s  err {err:.1e}", flush=True)
        except Exception as e:
            print(f"  {label:34s} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)


def run_case(case: Case, args, dtype, device) -> list[dict]:
    triton_be, sdpa_be = TritonBackend(), SDPABackend()
    backends = args.backends.split(",")
    rows = []
    scale = 1.0 / math.sqrt(case.d)
    if case.kind == "vit":
        q, k, v, cu, mx, flops = make_vit_inputs(case, dtype, device)
        kv_bytes = None
        fns = {"triton": ((lambda: triton_be.varlen_attention(q, k, v, cu, mx, scale)), None),
               "sdpa": ((lambda: sdpa_be.varlen_attention(q, k, v, cu, mx, scale)), None)}
        if len(case.vit_lens) == 1:
            qb, kb, vb = (x.transpose(0, 1)[None].contiguous() for x in (q, k, v))
            fns["sdpa_best"] = ((lambda: F.scaled_dot_product_attention(qb, kb, vb, scale=scale)), None)
        else:
            fns["sdpa_best"] = (None, "needs one image")
        fns["flash"] = ((lambda: flash_attn_varlen_func(q, k, v, cu, cu, mx, mx, softmax_scale=scale)), None) \
            if flash_attn_varlen_func is not None else (None, f"flash_attn not importable ({FLASH_ERR})")
    else:
        q, k_new, v_new, k_cache, v_cache, meta = make_paged_inputs(case, args.page, dtype, device)
        inputs = (q, k_new, v_new, k_cache, v_cache, meta, scale)
        flops = prefill_flops(case.q_lens, case.ctx_lens, case.causal, case.hq, case.d)
        decode = all(n == 1 for n in case.q_lens)
        kv_bytes = decode_kv_bytes(case.ctx_lens, case.hkv, case.d, k_cache.element_size()) if decode else None
        fns = {"triton": ((lambda: triton_be.paged_attention(*inputs)), None),
               "sdpa": ((lambda: sdpa_be.paged_attention(*inputs)), None)}
        if "sdpa_best" in backends:
            fns["sdpa_best"] = sdpa_best_fn(case, *inputs)
        if "flash" in backends:
            fns["flash"] = flash_paged_fn(case, *inputs)

    # Correctness first: the Triton result against the reference at this very shape.
    err = (fns["triton"][0]().float() - fns["sdpa"][0]().float()).abs().max().item()
    print(f"[check] {case.name}: triton vs sdpa max abs err {err:.3e}", flush=True)

    for name in backends:
        fn, why = fns.get(name, (None, "unknown backend"))
        row = dict(case=case.name, backend=name, ms=None, graph_ms=None, tflops=None, gbs=None,
                   err=err if name == "triton" else None, note=why or "")
        if fn is not None:
            try:
                ms = bench(fn, device, args.warmup, args.rep)
                row.update(ms=ms, tflops=flops / ms / 1e9, gbs=(kv_bytes / ms / 1e6) if kv_bytes else None)
                if args.graph and device == "cuda" and name in ("triton", "sdpa_best"):
                    row["graph_ms"] = bench_graph(fn)
            except Exception as e:  # one failing baseline must not end the run
                row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        rows.append(row)
        print(f"  {name:10s} " + (f"{row['ms']:.3f} ms" if row["ms"] is not None else row["note"]), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], device_name: str, dtype) -> str:
    def fmt(x, f):
        return "" if x is None else format(x, f if abs(x) >= 1 else ".3g")

    out = [f"Attention, {device_name}, {str(dtype).replace('torch.', '')} (median ms per call; TFLOP/s and "
           "GB/s from the eager ms; 'graph ms' replayed from a CUDA graph, without host overhead)", "",
           "| case | backend | ms | graph ms | TFLOP/s | GB/s (KV read) | max abs err vs sdpa | note |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['backend']} | {fmt(r['ms'], '.3f')} | {fmt(r['graph_ms'], '.3f')} | "
                   f"{fmt(r['tflops'], '.1f')} | {fmt(r['gbs'], '.0f')} | {fmt(r['err'], '.2e')} | {r['note']} |")
    return "\n".join(out)


def main(args) -> None:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --small for the interpreter smoke run")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device == "cuda" else "fp32")]
    torch.manual_seed(0)
    cases = build_cases(args.small, set(args.cases.split(",")))
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    if args.sweep:
        if device != "cuda":
            sys.exit("--sweep needs --device cuda")
        for case in cases:
            sweep_case(case, args, dtype, device)
        return
    rows = []
    for case in cases:
        rows += run_case(case, args, dtype, device)
    table = markdown(rows, device_name, dtype)
    print()
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main(ARGS)
