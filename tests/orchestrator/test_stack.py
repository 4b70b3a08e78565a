"""The main job (`bagel-serve demo`): the local stack as separate processes (redis-server, S3 server,
three model servers, a Celery worker, the gateway), every workflow through the public API, then a
clean shutdown."""

from __future__ import annotations

import socket

import pytest
from PIL import Image

from services.orchestrator.demo import run_demo

pytestmark = pytest.mark.servers  # starts the whole stack as processes itself


def test_demo_runs_every_workflow_through_the_stack(tiny_ckpt_dir, tmp_path):
    report = run_demo(tmp_path / "out", tmp_path / "stack", checkpoint=str(tiny_ckpt_dir))
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
    # Everything was stopped: nothing listens on the gateway's port (SO_REUSEADDR: closed connections
    # may linger in TIME_WAIT, a listener may not).
    port = int(report["stack"]["http"].rsplit(":", 1)[1])
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
