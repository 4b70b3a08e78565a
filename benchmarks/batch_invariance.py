"""Scheduler benchmark: the cost of the batch-invariant mode. N concurrent text-to-image requests run
through the Scheduler with shared forwards (the default) and with batch_invariant=True (each request's
unit in a forward of its own, results bit-identical to a solo run).

    python benchmarks/batch_invariance.py --preset small --requests 4 --size 64 --steps 10   # CPU
    python benchmarks/batch_invariance.py --preset bagel-7b-mot --device cuda --size 512

Weights are random (benchmarks/engine.py's random_engine). Each run submits all requests at once and
times until the last is done (context building included); the two modes' runs are interleaved, and the
table gives the medians of --repeats runs after one warm-up each.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # run from a checkout without installing
from engine import add_engine_arguments, engine_from_args, timed_pair  # noqa: E402  (benchmarks/engine.py)
from services.common.contracts import Controls, ImageParams, TextItem  # noqa: E402
from services.llm.scheduler import Scheduler  # noqa: E402


def run_concurrent(llm, n: int, size: int, steps: int, batch_invariant: bool) -> None:
    """n requests (different prompts and seeds) submitted together; returns when all are done."""
    sched = Scheduler(llm, batch_invariant=batch_invariant)
    try:
        gate = threading.Event()  # hold the loop until all are queued, so they overlap from step one
        sched.submit(lambda: iter(gate.wait(30) and ()), Controls())
        futs = [sched.generate_image([TextItem(f"a small red boat number {i} on a calm lake")],
                                     ImageParams(width=size, height=size, num_timesteps=steps, seed=i,
                                                 cfg_interval=(0.0, 1.0)))
                for i in range(n)]
        gate.set()
        for f in futs:
            f.result()
    finally:
        sched.shutdown(cancel=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--requests", type=int, default=4, help="concurrent requests")
    ap.add_argument("--size", type=int, default=64, help="square output side (pixels)")
    ap.add_argument("--steps", type=int, default=10, help="timesteps (steps-1 model evaluations per request)")
    ap.add_argument("--repeats", type=int, default=3)
    add_engine_arguments(ap)
    args = ap.parse_args()
    llm, sync = engine_from_args(args)
    n, model_steps = args.requests, args.steps - 1
    shared, invariant = timed_pair(lambda: run_concurrent(llm, n, args.size, args.steps, False),
                                   lambda: run_concurrent(llm, n, args.size, args.steps, True), args.repeats, sync)

    print(f"\npreset={args.preset} device={args.device} dtype={llm.dtype} attention={llm.attention.name} "
          f"torch threads={torch.get_num_threads()}; {n} concurrent text-to-image requests, {args.size}px, "
          f"{model_steps} steps, 2 CFG branches\n")
    print("| mode | wall time (s) | requests/s | denoising steps/s |\n|---|---|---|---|")
    for label, sec in (("shared forwards (default)", shared), ("batch-invariant", invariant)):
        print(f"| {label} | {sec:.3f} | {n / sec:.2f} | {n * model_steps / sec:.1f} |")
    print(f"| batch-invariant cost | x{invariant / shared:.2f} time | | |")


if __name__ == "__main__":
    main()
