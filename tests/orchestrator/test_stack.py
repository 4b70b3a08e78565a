"""The main job (`bagel-serve demo`): the local stack as separate processes (redis-server, S3 server,
three model servers, a Celery worker, the gateway), every workflow through the public API, a process
killed and restarted by the stack's supervisor, then a clean shutdown. One stack for the module: starting
it is the slow part."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import time

import httpx
import pytest
from PIL import Image

from services.orchestrator.demo import demo_picture, run_demo
from services.orchestrator.stack import LocalStack, _grpc_serving

pytestmark = pytest.mark.servers  # starts the whole stack as processes itself


@pytest.fixture(scope="module")
def stack(tiny_ckpt_dir, tmp_path_factory):
    s = LocalStack(tmp_path_factory.mktemp("stack"), checkpoint=str(tiny_ckpt_dir)).start()
    yield s
    s.stop()


def test_demo_runs_every_workflow_through_the_stack(stack, tmp_path):
    report = run_demo(tmp_path / "out", tmp_path / "unused", stack=stack)
    assert report["understand"]["state"] == "JOB_STATE_SUCCEEDED" and report["understand"]["tokens"] == 16
    assert report["generate"]["state"] == "JOB_STATE_SUCCEEDED" and report["generate"]["seed"] == 42
    assert Image.open(tmp_path / "out" / "generate.png").size == (256, 256)
    # The 128x96 input after the VAE resize: short side 512, multiples of 16.
    assert report["edit"]["state"] == "JOB_STATE_SUCCEEDED" and report["edit"]["size"] == [688, 512]
    assert Image.open(tmp_path / "out" / "edit.png").size == (688, 512)
    assert report["edit"]["progress_updates"] >= 1
    assert report["cancelled_job"]["state"] == "JOB_STATE_CANCELLED"
    # The stack made its own token and requires it (the demo's calls above carried it).
    assert report["auth"] == {"http_without_token": 401, "grpc_without_token": "UNAUTHENTICATED"}


def test_a_killed_process_is_restarted_on_its_port(stack):
    ready = httpx.get(stack.http_url + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["workers"] >= 1
    old = {name: stack.processes[name].pid for name in ("worker", "vit")}
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while not (all(stack.processes[n].pid != pid and stack.processes[n].poll() is None for n, pid in old.items())
               and _grpc_serving(f"127.0.0.1:{stack.ports['vit']}")):
        assert time.monotonic() < deadline, {n: stack.log_tail(n) for n in old}
        time.sleep(0.2)
    assert stack.restart_count == {"worker": 1, "vit": 1} and not stack.gave_up
    # A job accepted afterwards runs on the new worker and the new ViT server (understanding uses it).
    buf = io.BytesIO()
    demo_picture().save(buf, "PNG")
    with httpx.Client(base_url=stack.http_url, timeout=300,
                      headers={"authorization": f"Bearer {stack.auth_token}"}) as http:
        job = http.post("/v1/jobs", params={"wait": 240}, json={
            "workflow": "understand", "image": base64.b64encode(buf.getvalue()).decode(), "prompt": "What?",
            "text_params": {"max_new_tokens": 4}}).json()
    assert job["state"] == "JOB_STATE_SUCCEEDED", job
    assert httpx.get(stack.http_url + "/readyz", timeout=30).status_code == 200


def test_stop_ends_every_process(stack):
    stack.stop()
    assert all(p.poll() is not None for p in stack.processes.values())
    # Nothing listens on the gateway's port (SO_REUSEADDR: closed connections may linger in TIME_WAIT,
    # a listener may not).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", stack.ports["http"]))
