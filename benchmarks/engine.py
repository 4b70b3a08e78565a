"""LLM engine benchmark: text-to-image and editing with the CFG branches batched into one forward vs
run branch by branch (as the reference does), and understanding decode speed.

    python benchmarks/engine.py --preset small --size 256 --steps 10            # CPU, small preset
    python benchmarks/engine.py --preset bagel-7b-mot --device cuda --size 512   # GPU, 7B-sized random weights

Weights are random (initialised directly on the device, no checkpoint file), which is all a speed
measurement needs; image context items are random tensors of the right shapes, so only the LLM side
(where CFG batching happens) is timed. Prints a markdown table; latencies are the median of --repeats
runs after one warm-up (batched and branch-by-branch runs interleaved).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from services.common.config import preset
from services.common.tokenizer import BagelTokenizer, packaged_tokenizer_dir
from services.attention import get_backend
from services.llm.engine import LLMEngine
from services.common.contracts import ImageParams, TextItem, TextParams, VAEImageItem, ViTImageItem
from services.llm.model import BagelLLM


def random_engine(preset_name: str, device: str, dtype: torch.dtype, attention: str | None,
                  kv_tokens: int) -> LLMEngine:
    cfg = preset(preset_name)
    with torch.device("meta"):
        model = BagelLLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    model.eval().requires_grad_(False)
    return LLMEngine(model, BagelTokenizer(packaged_tokenizer_dir()), attention=get_backend(attention, device),
                     kv_cache_tokens=kv_tokens)


def timed_pair(fn_a, fn_b, repeats: int, sync) -> tuple[float, float]:
    """Median latencies of two alternatives, runs interleaved (a, b, a, b...) after one warm-up each,
    so that drift of a shared machine hits both alike."""
    fn_a(), fn_b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    out = fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def add_engine_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of a random engine, shared by the engine benchmarks."""
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--attention", default=None, help="sdpa or triton (default: triton on CUDA)")
    ap.add_argument("--kv-tokens", type=int, default=65536)


def engine_from_args(args: argparse.Namespace):
    """(engine with random weights of args.preset, a device sync for timing) from add_engine_arguments'."""
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    return random_engine(args.preset, args.device, dtype, args.attention, args.kv_tokens), sync


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--size", type=int, default=256, help="square output side (pixels)")
    ap.add_argument("--steps", type=int, default=10, help="timesteps (steps-1 model evaluations)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens for understanding")
    add_engine_arguments(ap)
    args = ap.parse_args()
    llm, sync = engine_from_args(args)
    cfg = llm.cfg
    g = torch.Generator().manual_seed(0)
    prompt = "A photograph of a small red boat on a calm lake at sunrise, mist over the water, soft light"
    side = args.size // cfg.latent_downsample  # latent tokens per side
    vit_side = min(args.size // cfg.vit.patch_size, cfg.vit_max_num_patch_per_side)
    vae_item = VAEImageItem(torch.randn(cfg.latent_channels, side * 2, side * 2, generator=g))
    vit_item = ViTImageItem(torch.randn(vit_side * vit_side, cfg.vit.hidden_size, generator=g), (vit_side, vit_side))
    rows = []
    n_steps = args.steps - 1

    t2i = ImageParams(width=args.size, height=args.size, num_timesteps=args.steps, seed=0, cfg_interval=(0.0, 1.0))
    edit = ImageParams.for_edit(args.size, args.size, num_timesteps=args.steps, seed=0)
    edit_items = [vae_item, vit_item, TextItem("make the water green")]
    for workload, items, params in (("text-to-image (2 branches)", [TextItem(prompt)], t2i),
                                    ("edit (3 branches)", edit_items, edit)):
        batched, branchwise = timed_pair(lambda: llm.generate_image(items, params, batch_cfg=True),
                                         lambda: llm.generate_image(items, params, batch_cfg=False), args.repeats, sync)
        for label, sec in (("batched", batched), ("branch by branch", branchwise)):
            rows.append((f"{workload} {args.size}px, {n_steps} steps, {label}", sec, f"{n_steps / sec:.2f} steps/s"))
        rows.append((f"{workload}: batched speed-up", None, f"x{branchwise / batched:.2f}"))

    und_items = [vit_item, TextItem("Describe the picture in detail.")]
    sec, res = timed(lambda: llm.understand(und_items, TextParams(max_new_tokens=args.tokens)), args.repeats, sync)
    rows.append((f"understand ({vit_item.features.shape[0]} image tokens + question), {res.tokens} new tokens",
                 sec, f"{res.tokens / sec:.1f} tok/s incl. prefill"))

    print(f"\npreset={args.preset} device={args.device} dtype={llm.dtype} attention={llm.attention.name} "
          f"torch threads={torch.get_num_threads()}\n")
    print("| workload | median latency (s) | rate |\n|---|---|---|")
    for name, sec, rate in rows:
        print(f"| {name} | {'' if sec is None else f'{sec:.3f}'} | {rate} |")


if __name__ == "__main__":
    main()
