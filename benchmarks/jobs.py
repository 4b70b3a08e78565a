"""The job API's cost: the same text-to-image request called directly on the model services (the
workflow over gRPC, services/orchestrator/remote.py) and as a job through the gateway (HTTP `?wait=`
and gRPC `Run`), on the local stack (services/orchestrator/stack.py: redis-server, S3 server, three
model servers, one Celery worker, the gateway, each its own process), with random weights of a preset.

    python benchmarks/jobs.py --preset small --size 256 --steps 10

Prints markdown tables:
  latency     median seconds per request: direct, job over HTTP, job over gRPC Run; the difference is
              what the gateway, Redis, Celery and the worker add per job
  throughput  jobs per second with 1, 4 and 8 concurrent clients (the worker runs 8 jobs at once; the
              LLM server batches their denoising steps)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.protos import jobs_pb2, jobs_pb2_grpc  # noqa: E402
from services.common.storage import ObjectStore  # noqa: E402
from services.common.contracts import ImageParams  # noqa: E402
from services.dev.random_checkpoint import init_checkpoint  # noqa: E402
from services.orchestrator import workflows as wf  # noqa: E402
from services.orchestrator.remote import remote_clients  # noqa: E402
from services.orchestrator.stack import LocalStack  # noqa: E402

PROMPT = "A photograph of a small red boat on a calm lake at sunrise, mist over the water, soft light"


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    ckpt = init_checkpoint(args.preset, work / "ckpt", seed=0)
    params = {"width": args.size, "height": args.size, "num_timesteps": args.steps, "seed": 1}
    body = {"workflow": "generate", "prompt": PROMPT, "image_params": params}
    with LocalStack(work / "stack", checkpoint=ckpt, worker_concurrency=8) as stack:
        env = stack.env
        store = ObjectStore(stack.s3.config(stack.bucket))
        direct = remote_clients(env["BAGEL_VIT_ADDR"], env["BAGEL_VAE_ADDR"], env["BAGEL_LLM_ADDR"], store=store,
                                job_id="bench-direct")
        http = httpx.Client(base_url=stack.http_url, timeout=600)
        channel = grpc.insecure_channel(stack.grpc_address)
        stub = jobs_pb2_grpc.JobServiceStub(channel)

        def run_direct():
            wf.generate(direct, PROMPT, ImageParams(**params))

        def run_http():
            job = http.post("/v1/jobs", params={"wait": 600}, json=body).json()
            assert job["state"] == "JOB_STATE_SUCCEEDED", job

        def run_grpc():
            *_, final = stub.Run(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt=PROMPT,
                                                           image_params=params), timeout=600)
            assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final

        for fn in (run_direct, run_http, run_grpc):  # warm-up: first calls load kernels, open connections
            fn()
        samples: dict[str, list[float]] = {"direct": [], "job over HTTP": [], "job over gRPC Run": []}
        for _ in range(args.repeats):  # interleaved, so drift affects every path alike
            for name, fn in zip(samples, (run_direct, run_http, run_grpc)):
                samples[name] += timed(fn, 1)

        print(f"\n{args.preset} preset, {args.size}px, {args.steps} timesteps, {args.repeats} runs each\n")
        print("| path | median s | added over direct |")
        print("|---|---|---|")
        base = statistics.median(samples["direct"])
        for name, values in samples.items():
            med = statistics.median(values)
            print(f"| {name} | {med:.3f} | {'' if name == 'direct' else f'{(med - base) * 1000:+.0f} ms'} |")

        print("\n| concurrent clients | jobs/s (HTTP, `?wait=`) | median s per job |")
        print("|---|---|---|")
        for n in args.concurrency:
            per_client = max(2, args.repeats)
            lat: list[float] = []
            lock = threading.Lock()

            def client():
                with httpx.Client(base_url=stack.http_url, timeout=600) as c:
                    for _ in range(per_client):
                        t = time.perf_counter()
                        job = c.post("/v1/jobs", params={"wait": 600}, json=body).json()
                        assert job["state"] == "JOB_STATE_SUCCEEDED", job
                        with lock:
                            lat.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            print(f"| {n} | {n * per_client / elapsed:.2f} | {statistics.median(lat):.2f} |")
        http.close()
        channel.close()
        direct.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
