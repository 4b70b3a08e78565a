"""The gateway under load, on the local stack (services/orchestrator/stack.py: redis-server, S3 server, three
model servers, one Celery worker, the gateway, each its own process), with random weights of a preset.

    python benchmarks/gateway_load.py --preset tiny --size 64 --steps 4

Prints markdown tables:
  streams   /healthz latency (p50, p90, p99, max of sequential requests) and the gateway process's
            threads and RSS with 0, 100 and 500 open event streams (`GET /v1/jobs/{id}/events`) on jobs
            that stay queued: waiting clients should cost coroutines, not threads
  openai    median seconds of the same small request through the job API (`POST /v1/jobs?wait=`) and
            through the OpenAI-compatible API (images: `b64_json`; chat: an understand job), interleaved;
            the difference is what the OpenAI layer adds per request
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.protos import jobs_pb2  # noqa: E402
from services.dev.random_checkpoint import init_checkpoint  # noqa: E402
from services.orchestrator.jobs import JobStore  # noqa: E402
from services.orchestrator.stack import LocalStack  # noqa: E402

PROMPT = "A photograph of a small red boat on a calm lake at sunrise, mist over the water, soft light"
QUESTION = "What is in the picture?"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def process_footprint(pid: int) -> tuple[int, float]:
    """Threads and resident MiB of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024


async def with_streams(stack: LocalStack, job_ids: list[str], probes: int) -> dict:
    """Opens one event stream per job, waits until each has sent its first event, then times /healthz."""
    limits = httpx.Limits(max_connections=len(job_ids) + 100, max_keepalive_connections=0)
    opened = 0
    all_open = asyncio.Event()

    async def listen(client: httpx.AsyncClient, job_id: str) -> None:
        nonlocal opened
        async with client.stream("GET", f"/v1/jobs/{job_id}/events", params={"wait": 300}) as r:
            r.raise_for_status()
            first = True
            async for _ in r.aiter_bytes():  # held open: the job stays queued, only keep-alives follow
                if first:
                    first, opened = False, opened + 1
                    if opened == len(job_ids):
                        all_open.set()

    async with httpx.AsyncClient(base_url=stack.http_url, timeout=60, limits=limits) as streams:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(listen(streams, j)) for j in job_ids]
        if job_ids:
            await asyncio.wait_for(all_open.wait(), 120)
        open_s = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # let the opening burst settle
        threads, rss = process_footprint(stack.processes["gateway"].pid)
        # A separate client with one kept-alive connection: a liveness probe's view, not the streams' pool.
        async with httpx.AsyncClient(base_url=stack.http_url, timeout=30) as probe:
            await probe.get("/healthz")
            lat = []
            for _ in range(probes):
                t = time.perf_counter()
                r = await probe.get("/healthz")
                lat.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
        failed = [t for t in tasks if t.done() and t.exception() is not None]
        assert not failed, failed[0].exception()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"lat": lat, "threads": threads, "rss": rss, "open_s": open_s}


def png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8, help="answer length of the chat / understand requests")
    p.add_argument("--streams", type=int, nargs="+", default=[0, 100, 500])
    p.add_argument("--probes", type=int, default=200, help="sequential /healthz requests per stream count")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    ckpt = init_checkpoint(args.preset, work / "ckpt", seed=0)
    with LocalStack(work / "stack", checkpoint=ckpt) as stack:
        # Job records that are never queued: they stay QUEUED, so their event streams stay open and idle.
        store = JobStore.from_url(stack.redis.url)
        queued = [store.create(jobs_pb2.SubmitJobRequest(workflow=jobs_pb2.WORKFLOW_GENERATE, prompt="never sent")).job.id
                  for _ in range(max(args.streams))]
        rows = [(n, asyncio.run(with_streams(stack, queued[:n], args.probes))) for n in args.streams]
        for job_id in queued:
            store.request_cancel(job_id)

        print(f"\n/healthz, {args.probes} sequential requests per row, streams held by one client\n")
        print("| open event streams | p50 ms | p90 ms | p99 ms | max ms | gateway threads | gateway RSS MiB "
              "| s to open all |")
        print("|---|---|---|---|---|---|---|---|")
        for n, r in rows:
            ms = [percentile(r["lat"], q) * 1000 for q in (0.5, 0.9, 0.99, 1.0)]
            print(f"| {n} | {ms[0]:.1f} | {ms[1]:.1f} | {ms[2]:.1f} | {ms[3]:.1f} | {r['threads']} "
                  f"| {r['rss']:.0f} | {r['open_s']:.2f} |")

        http = httpx.Client(base_url=stack.http_url, timeout=300)
        model = http.get("/v1/models").json()["data"][0]["id"]
        image = png(args.size)
        data_url = "data:image/png;base64," + base64.b64encode(image).decode()

        def job(body: dict) -> None:
            r = http.post("/v1/jobs", params={"wait": 120}, json=body)
            assert r.status_code == 200 and r.json()["state"] == "JOB_STATE_SUCCEEDED", r.text

        def job_and_image(body: dict) -> None:
            r = http.post("/v1/jobs", params={"wait": 120}, json=body)
            assert r.status_code == 200 and r.json()["state"] == "JOB_STATE_SUCCEEDED", r.text
            assert http.get(f"/v1/jobs/{r.json()['id']}/image").status_code == 200

        def openai(path: str, body: dict) -> None:
            r = http.post(path, json={"model": model, **body})
            assert r.status_code == 200, r.text

        params = {"width": args.size, "height": args.size, "num_timesteps": args.steps, "seed": 1}
        gen_job = {"workflow": "generate", "prompt": PROMPT, "image_params": params}
        gen_openai = {"prompt": PROMPT, "size": f"{args.size}x{args.size}", "seed": 1,
                      "num_inference_steps": args.steps, "response_format": "b64_json"}
        und_job = {"workflow": "understand", "prompt": QUESTION, "image": base64.b64encode(image).decode(),
                   "text_params": {"max_new_tokens": args.tokens}}
        chat = {"max_tokens": args.tokens, "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": data_url}}]}]}
        paths = {
            "text-to-image, `POST /v1/jobs?wait=120`": lambda: job(gen_job),
            "text-to-image, the same, then `GET /v1/jobs/{id}/image`": lambda: job_and_image(gen_job),
            "text-to-image, `POST /v1/images/generations` (b64_json)": lambda: openai("/v1/images/generations",
                                                                                      gen_openai),
            "understand, `POST /v1/jobs?wait=120`": lambda: job(und_job),
            "understand, `POST /v1/chat/completions`": lambda: openai("/v1/chat/completions", chat),
        }
        for fn in paths.values():  # warm-up: first calls load kernels, open connections
            fn()
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeats):  # interleaved, so drift affects every path alike
            for name, fn in paths.items():
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
        http.close()

    print(f"\n{args.preset} preset, {args.size}px, {args.steps} timesteps, {args.tokens} answer tokens, "
          f"{args.repeats} sequential runs each, interleaved\n")
    print("| request | median s | vs the job API |")
    print("|---|---|---|")
    medians = {name: statistics.median(v) for name, v in samples.items()}
    bases = {"text-to-image": medians["text-to-image, `POST /v1/jobs?wait=120`"],
             "understand": medians["understand, `POST /v1/jobs?wait=120`"]}
    for name, med in medians.items():
        diff = (med - bases[name.split(",")[0]]) * 1000
        print(f"| {name} | {med:.3f} | {'' if name.endswith('/v1/jobs?wait=120`') else f'{diff:+.0f} ms'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
