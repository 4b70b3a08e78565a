"""Service split overhead: the same workflows (services/orchestrator/workflows.py) in-process and
distributed, on random weights of a preset.

    python benchmarks/service_split.py --preset small --size 256 --steps 10

Distributed means the ViT, VAE and LLM servers run as three separate processes on this machine
(`python -m services.serve ...`), called over gRPC by services/orchestrator/remote.py, with the ViT
features and VAE latents passed between them as objects in a local S3 server (s3rver, or MinIO when
on PATH). Prints markdown tables:

  latency     median seconds per request in-process vs distributed, text-to-image and editing, and per
              client call (ViT encode, VAE encode, LLM, VAE decode): where the extra time goes
  fixed cost  the smallest request of each call in-process vs distributed: the price of one hop
  throughput  requests per second with 1, 4 and 8 concurrent clients on short text-to-image requests;
              the in-process side runs its LLM through a Scheduler and its ViT/VAE one call at a time,
              as the servers do, so both sides batch the same way

Editing uses the official VAE resize, so its output is at least 512 px on the short side.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.checkpoint import Checkpoint  # noqa: E402
from services.common.storage import ObjectStore  # noqa: E402
from services.common.contracts import ImageParams, TextItem  # noqa: E402
from services.dev.ports import free_port  # noqa: E402
from services.dev.random_checkpoint import init_checkpoint  # noqa: E402
from services.dev.s3_server import start_local_s3  # noqa: E402
from services.llm.scheduler import Scheduler  # noqa: E402
from services.orchestrator import workflows as wf  # noqa: E402
from services.orchestrator.local import local_clients  # noqa: E402
from services.orchestrator.remote import remote_clients  # noqa: E402

HOPS = ("vit.encode", "vae.encode", "llm.generate_image", "vae.decode")
PROMPT = "A photograph of a small red boat on a calm lake at sunrise, mist over the water, soft light"


# ---- the servers, as separate processes -------------------------------------------------------------
def start_servers(ckpt: Path, s3, bucket: str, log_dir: Path) -> tuple[dict[str, str], list[subprocess.Popen]]:
    cfg = s3.config(bucket)
    env = {**os.environ, **cfg.to_env(), "PYTHONPATH": str(ROOT)}
    addresses, procs = {}, []
    for name in ("vit", "vae", "llm"):
        port = free_port()
        cmd = [sys.executable, "-m", "services.serve", name, "--host", "127.0.0.1", "--port", str(port),
               "--checkpoint", str(ckpt), "--drain-seconds", "0", "--grace-seconds", "1", "--max-concurrency", "32",
               "--log-level", "WARNING"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=open(log_dir / f"{name}.log", "wb")))
        addresses[name] = f"127.0.0.1:{port}"
    for name, address in addresses.items():
        wait_serving(address, name, log_dir)
    return addresses, procs


def wait_serving(address: str, name: str, log_dir: Path, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the {name} server did not become ready; see {log_dir / (name + '.log')}")


# ---- timing --------------------------------------------------------------------------------------
class Timed:
    """A client whose method calls add their wall time to spent["<name>.<method>"]."""

    def __init__(self, inner, name: str, spent: dict[str, float]):
        self._inner, self._name, self._spent = inner, name, spent

    def __getattr__(self, attr):
        fn = getattr(self._inner, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._spent[f"{self._name}.{attr}"] += time.perf_counter() - t

        return timed


def timed_clients(c: wf.Clients, spent: dict[str, float]) -> wf.Clients:
    return wf.Clients(vit=Timed(c.vit, "vit", spent), vae=Timed(c.vae, "vae", spent), llm=Timed(c.llm, "llm", spent))


def latency(modes: dict[str, wf.Clients], run, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of run(clients), in all and per hop, per mode; the modes alternate, after a warm-up each."""
    for c in modes.values():
        run(c)
    samples: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in modes}
    for _ in range(repeats):
        for mode, c in modes.items():
            spent: dict[str, float] = defaultdict(float)
            t = time.perf_counter()
            run(timed_clients(c, spent))
            samples[mode]["total"].append(time.perf_counter() - t)
            for hop in HOPS:
                samples[mode][hop].append(spent[hop])
    return samples


def call_cost(fn, repeats: int) -> float:
    """Median seconds of fn() after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def throughput(c: wf.Clients, run, n_clients: int, requests: int) -> float:
    """Requests per second with n_clients threads sharing `requests` requests."""
    counter, lock = itertools.count(), threading.Lock()

    def worker():
        while True:
            with lock:
                if next(counter) >= requests:
                    return
            run(c)

    threads = [threading.Thread(target=worker) for _ in range(n_clients)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return requests / (time.perf_counter() - t)


# ---- in-process clients shaped like the servers ------------------------------------------------------
class SchedulerLLM:
    """The in-process engine behind a Scheduler, as the LLM server runs it: concurrent requests share forwards."""

    def __init__(self, engine):
        self.scheduler = Scheduler(engine)

    def generate_image(self, items, params, think=False, think_params=None, controls=None, session=None):
        return self.scheduler.generate_image(items, params, think, think_params, controls).result().result

    def understand(self, items, params=None, think=False, controls=None, session=None):
        return self.scheduler.understand(items, params, think, controls).result().result


class OneAtATime:
    """An engine used by one call at a time, as the ViT and VAE servers' engine slot does."""

    def __init__(self, inner):
        self._inner, self._lock = inner, threading.Lock()

    def __getattr__(self, attr):
        fn = getattr(self._inner, attr)

        def locked(*args, **kwargs):
            with self._lock:
                return fn(*args, **kwargs)

        return locked


def load_average() -> str:
    """Other work on the machine shows up in the timings: print it with them."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--checkpoint", default=None, help="use this checkpoint instead of random weights of --preset")
    ap.add_argument("--size", type=int, default=256, help="text-to-image side (pixels)")
    ap.add_argument("--steps", type=int, default=10, help="timesteps of the latency runs")
    ap.add_argument("--edit-image", type=int, default=512, help="edit input side (the VAE resize keeps >= 512)")
    ap.add_argument("--repeats", type=int, default=5, help="text-to-image latency runs per mode")
    ap.add_argument("--edit-repeats", type=int, default=2, help="edit latency runs per mode")
    ap.add_argument("--hop-repeats", type=int, default=20, help="runs of each smallest call")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--rps-size", type=int, default=128, help="side of the throughput requests")
    ap.add_argument("--rps-steps", type=int, default=5, help="timesteps of the throughput requests")
    ap.add_argument("--rps-requests", type=int, default=16, help="requests per throughput measurement")
    args = ap.parse_args()

    print(f"load average at start: {load_average()} (1/5/15 min; {os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else init_checkpoint(args.preset, tmp / "ckpt", seed=0)
        with start_local_s3(tmp / "s3", buckets=("bench",)) as s3:
            addresses, procs = start_servers(ckpt, s3, "bench", tmp)
            try:
                run_benchmarks(args, ckpt, s3, addresses)
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait(timeout=30)
    print(f"\nload average at the end: {load_average()}")


def run_benchmarks(args, ckpt: Path, s3, addresses: dict[str, str]) -> None:
    local = local_clients(ckpt)
    remote = remote_clients(addresses["vit"], addresses["vae"], addresses["llm"], store=ObjectStore(s3.config("bench")),
                            timeout=600, job_id="bench", cfg=Checkpoint(ckpt).config)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (args.edit_image, args.edit_image, 3), dtype=np.uint8))
    t2i = ImageParams(width=args.size, height=args.size, num_timesteps=args.steps, seed=0)
    edit = wf.edit_params(picture, num_timesteps=args.steps, seed=0)
    workloads = {
        f"text-to-image {args.size}px, {args.steps} timesteps": lambda c: wf.generate(c, PROMPT, t2i),
        f"edit {edit.width}x{edit.height}, {args.steps} timesteps": lambda c: wf.edit(c, picture, "make it blue", edit),
    }
    print(f"\n### Latency, `{args.preset}` preset (seconds; medians after a warm-up)\n")
    print("| workload | runs | mode | total | ViT encode | VAE encode | LLM | VAE decode |")
    print("|---|---|---|---|---|---|---|---|")
    overheads = []
    for (name, run), repeats in zip(workloads.items(), (args.repeats, args.edit_repeats)):
        samples = latency({"in-process": local, "distributed": remote}, run, repeats)
        med = {m: {k: statistics.median(v) for k, v in s.items()} for m, s in samples.items()}
        for mode, r in med.items():
            print(f"| {name} | {repeats} | {mode} | {r['total']:.3f} | " + " | ".join(f"{r[h]:.3f}" for h in HOPS)
                  + " |")
        lo, re_ = med["in-process"], med["distributed"]
        # runs alternate, so run i of each mode saw the same machine state: pair them
        ratio = statistics.median(d / i for d, i in zip(samples["distributed"]["total"],
                                                        samples["in-process"]["total"]))
        hops = ", ".join(f"{h} {re_[h] - lo[h]:+.3f} s" for h in HOPS if lo[h] or re_[h])
        overheads.append(f"- {name}: distributed / in-process = x{ratio:.3f} (median of paired runs); "
                         f"by call: {hops}")
    print("\n" + "\n".join(overheads))

    # The fixed price of a hop: the smallest request of each call, where the model's work is nearly nil.
    tiny_image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    tiny_latent = local.vae.encode(tiny_image).latent  # [16, 4, 4]
    tiny_params = ImageParams(width=32, height=32, num_timesteps=2, seed=0)
    calls = {
        "ViT encode, 32x32 image": lambda c: c.vit.encode([tiny_image]),
        "VAE encode, 32x32 image": lambda c: c.vae.encode(tiny_image),
        "LLM generate, 32x32, 1 step": lambda c: c.llm.generate_image([TextItem("x")], tiny_params),
        "VAE decode, 4x4 latent": lambda c: c.vae.decode(tiny_latent),
    }
    print(f"\n### Fixed cost of one call (milliseconds, median of {args.hop_repeats})\n")
    print("| call | in-process | distributed | added by the split |")
    print("|---|---|---|---|")
    for name, fn in calls.items():
        a, b = call_cost(lambda: fn(local), args.hop_repeats), call_cost(lambda: fn(remote), args.hop_repeats)
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {(b - a) * 1e3:+.1f} |")

    rps_params = ImageParams(width=args.rps_size, height=args.rps_size, num_timesteps=args.rps_steps, seed=0)

    def short(c):
        return wf.generate(c, PROMPT, rps_params)

    shaped = wf.Clients(vit=OneAtATime(local.vit), vae=OneAtATime(local.vae), llm=SchedulerLLM(local.llm.engine))
    short(shaped)  # warm-up
    short(remote)
    print(f"\n### Throughput: text-to-image {args.rps_size}px, {args.rps_steps} timesteps, "
          f"{args.rps_requests} requests per point (requests/s)\n")
    print("| concurrent clients | in-process (scheduler) | distributed | distributed / in-process |")
    print("|---|---|---|---|")
    for n in args.clients:
        a = throughput(shaped, short, n, args.rps_requests)
        b = throughput(remote, short, n, args.rps_requests)
        print(f"| {n} | {a:.2f} | {b:.2f} | x{b / a:.3f} |")
    shaped.llm.scheduler.shutdown()
    remote.close()


if __name__ == "__main__":
    main()
