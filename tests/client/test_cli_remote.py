"""`bagel-serve submit` / `jobs` as subprocesses against the real local stack: exit codes, JSON lines
when stdout is not a terminal, the image at --out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from bagel_serve.client import Client, JobState
from client_stack import TOKEN
from service_helpers import noise_image


def bagel(urls, *args: str, transport: str = "http", **kwargs):
    env = {**os.environ, "BAGEL_URL": urls[transport], "BAGEL_TOKEN": TOKEN}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, **kwargs)


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_submit_watch_writes_the_image_and_json_lines(urls, tmp_path):
    out = tmp_path / "boat.png"
    r = bagel(urls, "submit", "generate", "--prompt", "a red boat", "--size", "32x32", "--steps", "3", "--seed",
              "5", "--watch", "--out", str(out))
    assert r.returncode == 0, r.stderr
    events = lines(r.stdout)
    assert events[-1]["event"] == "job" and events[-1]["out"] == str(out)
    final = events[-1]["job"]
    assert final["state"] == "JOB_STATE_SUCCEEDED" and final["result"]["seed"] == "5"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["state"] == "SUCCEEDED" and all(e["id"] == final["id"] for e in progress)
    with Client(urls["http"], token=TOKEN) as c:  # the file is the job's image
        assert np.array_equal(np.asarray(Image.open(out).convert("RGB")),
                              np.asarray(c.result(final["id"]).image.convert("RGB")))


def test_understand_over_grpc_then_jobs_get(urls, tmp_path):
    noise_image(24, 24, seed=3).save(tmp_path / "in.png")
    r = bagel(urls, "submit", "understand", "--image", str(tmp_path / "in.png"), "--prompt", "what?",
              "--max-new-tokens", "3", "--wait", transport="grpc")
    assert r.returncode == 0, r.stderr
    (final,) = lines(r.stdout)  # --wait: no progress lines, the final job only
    assert final["job"]["result"]["tokens"] == 3
    r = bagel(urls, "jobs", "get", final["job"]["id"])
    assert r.returncode == 0 and lines(r.stdout)[0]["job"]["result"] == final["job"]["result"]


def test_bad_input_exits_2(urls, tmp_path):
    r = bagel(urls, "submit", "generate", "--prompt", "x", "--size", "32x33")
    assert r.returncode == 2 and "INVALID_ARGUMENT" in r.stderr
    r = bagel(urls, "submit", "edit", "--prompt", "x", "--image", str(tmp_path / "missing.png"))
    assert r.returncode == 2 and "missing.png" in r.stderr
    r = bagel(urls, "jobs", "watch", "0123abcd", transport="grpc")
    assert r.returncode == 2 and "NOT_FOUND" in r.stderr
    r = subprocess.run([sys.executable, "-m", "services.cli", "jobs", "get", "0123abcd", "--url", urls["http"]],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "BAGEL_TOKEN": ""})
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr  # refused, not bad input


def test_a_job_cancelled_while_watched_exits_130(urls):
    env = {**os.environ, "BAGEL_URL": urls["http"], "BAGEL_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "submit", "generate", "--prompt", "slow",
                             "--size", "256x256", "--steps", "1000", "--watch"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:  # until the job is denoising
            event = json.loads(line)
            if event.get("stage") == "denoise":
                break
        with Client(urls["grpc"], token=TOKEN) as c:
            c.cancel(event["id"])
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 130
        assert lines(rest)[-1]["job"]["state"] == "JOB_STATE_CANCELLED"
        with Client(urls["http"], token=TOKEN) as c:
            assert c.get(event["id"]).state is JobState.CANCELLED
    finally:
        proc.kill()
        proc.wait()
