"""`serve` end to end: a real process started from the command line, stopped by SIGTERM."""

import argparse
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.protos import common_pb2, vit_pb2, vit_pb2_grpc
from services.serve import ServeError, add_serve_arguments, resolve_dtype, server_module
from service_helpers import noise_image, png_bytes

REPO = Path(__file__).resolve().parents[1]


def _log_lines(proc) -> "queue.Queue[dict]":
    lines: queue.Queue = queue.Queue()

    def pump():
        for raw in proc.stderr:
            try:
                lines.put(json.loads(raw))
            except ValueError:
                lines.put({"msg": raw.strip()})
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for(lines, msg, timeout=60):
    seen = []
    while True:
        line = lines.get(timeout=timeout)
        if line is None:
            raise AssertionError(f"process ended before logging {msg!r}: {seen}")
        seen.append(line)
        if line.get("msg") == msg:
            return line


def test_serve_command_serves_until_sigterm(tiny_ckpt_dir, s3, store):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAGEL_S3_")}
    cfg = s3.config(store.bucket)
    env.update(cfg.to_env())
    cmd = [sys.executable, "-m", "services.serve", "vit", "--host", "127.0.0.1", "--port", "0",
           "--checkpoint", str(tiny_ckpt_dir), "--drain-seconds", "0.2", "--grace-seconds", "2", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        lines = _log_lines(proc)
        port = _wait_for(lines, "listening")["port"]
        _wait_for(lines, "serving")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            req = vit_pb2.ViTEncodeRequest(job_id="serve-test", inputs=[
                vit_pb2.ViTEncodeInput(image=common_pb2.ImageRef(encoded=png_bytes(noise_image(16, 16))))])
            (feat,) = vit_pb2_grpc.ViTServiceStub(channel).Encode(req, timeout=30).features
        # Storage came from the BAGEL_S3_* environment, and is the default delivery when configured.
        assert feat.ref.key.startswith("jobs/serve-test/features/") and store.exists(feat.ref.key)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        messages = []
        while (line := lines.get(timeout=5)) is not None:
            messages.append(line.get("msg"))
        assert messages.index("draining") < messages.index("stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unknown_or_missing_servers_fail_clearly():
    with pytest.raises(ServeError, match="unknown service 'nope'"):
        server_module("nope")
    if importlib.util.find_spec("services.llm.server") is None:
        with pytest.raises(ServeError, match="llm server is not available"):
            server_module("llm")
    assert hasattr(server_module("vae"), "build_server")


def test_cli_arguments_and_dtype_defaults():
    parser = add_serve_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["vae", "--port", "7000", "--metrics-port", "9100", "--auth-token", "t",
                              "--max-concurrency", "3", "--max-message-mb", "8", "--tls-cert", "c", "--tls-key", "k"])
    assert (args.service, args.port, args.metrics_port, args.auth_token, args.max_concurrency, args.max_message_mb,
            args.tls_cert, args.tls_key, args.checkpoint) == ("vae", 7000, 9100, "t", 3, 8.0, "c", "k", None)
    with pytest.raises(SystemExit):
        parser.parse_args(["gpt"])
    import torch
    assert resolve_dtype("vit", "auto", "cpu") == torch.float32
    assert resolve_dtype("vit", "auto", "cuda") == torch.bfloat16
    assert resolve_dtype("vae", "auto", "cuda") == torch.float32


@pytest.mark.parametrize("command", [["serve", "vit"], ["gateway"], ["worker"]])
@pytest.mark.parametrize("env, says", [
    ({"BAGEL_AUTH_TOKEN": "REPLACE-ME-model-token"}, "BAGEL_AUTH_TOKEN is a placeholder"),
    ({"BAGEL_S3_SECRET_KEY": "change-me-please-now"}, "BAGEL_S3_SECRET_KEY is a placeholder"),
])
def test_placeholder_secrets_refused_at_start(command, env, says):
    # Redis and S3 point at a closed port: the refusal must come before connecting to either.
    env = {**os.environ, "BAGEL_S3_ENDPOINT": "127.0.0.1:9", "BAGEL_S3_SECRET_KEY": "a-real-secret-key",
           "BAGEL_REDIS_URL": "redis://127.0.0.1:9/0", "BAGEL_AUTH_TOKEN": "", **env}
    if command[0] == "serve" and "BAGEL_AUTH_TOKEN" in env and env["BAGEL_AUTH_TOKEN"]:
        says = "the auth token is a placeholder"
    out = subprocess.run([sys.executable, "-m", "services.cli", *command], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert says in out.stderr


def test_short_token_refused_only_off_loopback(tmp_path):
    from services.common.secrets import WeakSecret, check_token, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("bagel.example")
    check_token("short", "token", "127.0.0.1")  # local tries may use a short one
    with pytest.raises(WeakSecret, match="at least 16"):
        check_token("short", "token", "0.0.0.0")
    check_token("x" * 16, "token", "0.0.0.0")
    with pytest.raises(WeakSecret, match="placeholder"):
        check_token("ChangeMe-and-it-is-long-enough", "token", "127.0.0.1")
    # A short token off loopback, through the command line (--auth-token-file), before loading anything:
    # the checkpoint does not exist, and the refusal comes first.
    token = tmp_path / "token"
    token.write_text("short\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BAGEL_")}
    out = subprocess.run([sys.executable, "-m", "services.cli", "serve", "vae", "--host", "0.0.0.0", "--port", "0",
                          "--auth-token-file", str(token), "--checkpoint", str(tmp_path / "none")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "at least 16" in out.stderr, out.stderr[-2000:]
    token.write_text("")  # an empty token file must not turn authentication off
    out = subprocess.run([sys.executable, "-m", "services.cli", "serve", "vae", "--port", "0",
                          "--auth-token-file", str(token), "--checkpoint", str(tmp_path / "none")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "is empty" in out.stderr, out.stderr[-2000:]


def test_no_token_off_loopback_warns(caplog):
    from services.common.secrets import check_startup

    with caplog.at_level("WARNING", logger="bagel.secrets"):
        check_startup("the vit server", token=None, token_name="the auth token", s3_secret=None, host="127.0.0.1")
        assert not caplog.records
        check_startup("the vit server", token=None, token_name="the auth token", s3_secret=None, host="0.0.0.0")
    assert "WITHOUT authentication" in caplog.text


def test_serve_binds_loopback_by_default():
    from services.common.rpc import ServerOptions

    assert add_serve_arguments(argparse.ArgumentParser()).parse_args(["vit"]).host == "127.0.0.1"
    assert ServerOptions().host == "127.0.0.1" and ServerOptions().metrics_host is None
