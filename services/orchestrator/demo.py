"""The main job: the local stack up (Redis, S3, three model servers, a Celery worker, the gateway), then
every workflow once through the gateway's public API, as a product backend would call it:
understanding and text-to-image over HTTP/JSON (synchronous, `?wait=`), editing over gRPC (`Run`,
following the job's progress), plus an asynchronous job that is cancelled."""

from __future__ import annotations

import base64
import io
import time
from contextlib import nullcontext
from pathlib import Path

import grpc
import httpx
import numpy as np
from PIL import Image

from services.common.protos import jobs_pb2, jobs_pb2_grpc
from services.orchestrator.stack import LocalStack


def demo_picture() -> Image.Image:
    """A deterministic input picture: a gradient with a red square, so the run needs no files."""
    yy, xx = np.mgrid[0:96, 0:128]
    pic = np.stack([xx * 2, yy * 2, np.full_like(xx, 128)], -1).astype(np.uint8)
    pic[30:60, 40:80] = (250, 40, 40)
    return Image.fromarray(pic)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def run_demo(out_dir: Path, workdir: Path, checkpoint: str | None = None, device: str = "cpu",
             stack: LocalStack | None = None) -> dict:
    """With `stack`, on that running stack (left running), else on a new one stopped at the end."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image = demo_picture()
    image.save(out_dir / "input.png")
    image_b64 = base64.b64encode(_png(image)).decode()
    report: dict = {}
    with (nullcontext(stack) if stack is not None else LocalStack(workdir, checkpoint=checkpoint, device=device)) as stack, \
            httpx.Client(base_url=stack.http_url, timeout=660,
                         headers={"authorization": f"Bearer {stack.auth_token}"}) as http, \
            grpc.insecure_channel(stack.grpc_address) as channel:
        report["stack"] = {"http": stack.http_url, "grpc": stack.grpc_address, "redis": stack.redis.url,
                           "s3": f"{stack.s3.kind} at {stack.s3.endpoint}"}
        # The stack's token is required: a call without it is refused, on both fronts.
        anonymous = httpx.get(stack.http_url + "/v1/jobs/none", timeout=30).status_code
        try:
            jobs_pb2_grpc.JobServiceStub(channel).Get(jobs_pb2.GetJobRequest(id="none"), timeout=30)
            anonymous_grpc = "OK"
        except grpc.RpcError as e:
            anonymous_grpc = e.code().name
        report["auth"] = {"http_without_token": anonymous, "grpc_without_token": anonymous_grpc}
        auth = [("authorization", f"Bearer {stack.auth_token}")]

        t = time.perf_counter()
        job = _ok(http.post("/v1/jobs", params={"wait": 600}, json={
            "workflow": "understand", "image": image_b64, "prompt": "What is in this picture?",
            "text_params": {"max_new_tokens": 16}}))
        report["understand"] = {"job": job["id"], "state": job["state"], "answer": job["result"].get("text", ""),
                                "tokens": job["result"].get("tokens", 0), "seconds": round(time.perf_counter() - t, 2)}

        t = time.perf_counter()
        job = _ok(http.post("/v1/jobs", params={"wait": 600}, json={
            "workflow": "generate", "prompt": "a red square on a blue sky",
            "image_params": {"width": 256, "height": 256, "num_timesteps": 12, "seed": 42}}))
        png = http.get(f"/v1/jobs/{job['id']}/image").raise_for_status().content
        (out_dir / "generate.png").write_bytes(png)
        report["generate"] = {"job": job["id"], "state": job["state"], "out": str(out_dir / "generate.png"),
                              "seed": int(job["result"]["seed"]), "seconds": round(time.perf_counter() - t, 2)}

        t = time.perf_counter()
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        steps, final = 0, None
        for final in stub.Run(jobs_pb2.SubmitJobRequest(
                workflow=jobs_pb2.WORKFLOW_EDIT, image=_png(image), prompt="make the square green",
                image_params={"num_timesteps": 8, "seed": 7}, inline_image=True), timeout=600, metadata=auth):
            steps += final.progress.stage == "denoise"
        if final.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"edit job {final.id} ended {jobs_pb2.JobState.Name(final.state)}: {final.error}")
        (out_dir / "edit.png").write_bytes(final.result.image_png)
        report["edit"] = {"job": final.id, "state": jobs_pb2.JobState.Name(final.state),
                          "out": str(out_dir / "edit.png"), "size": [final.result.width, final.result.height],
                          "progress_updates": steps, "seconds": round(time.perf_counter() - t, 2)}

        job = _ok(http.post("/v1/jobs", json={"workflow": "generate", "prompt": "a long one",
                                              "image_params": {"width": 512, "height": 512,
                                                               "num_timesteps": 200}}))
        http.post(f"/v1/jobs/{job['id']}/cancel").raise_for_status()
        job = _ok(http.get(f"/v1/jobs/{job['id']}", params={"wait": 120}))
        report["cancelled_job"] = {"job": job["id"], "state": job["state"]}
    return report


def _ok(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url} -> {response.status_code}: "
                           f"{response.text}")
    return response.json()
