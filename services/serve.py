"""Run one model server: `serve("vit", port=50051)`, or from the command line

    bagel-serve serve vit|vae|llm [--host H] --port P [--checkpoint DIR] [--metrics-port M] [--tls-cert C --tls-key K]
                                  [--auth-token T] [--max-concurrency N] [--max-message-mb MB]
    python -m services.serve vit --port 0          # the same, without the package's CLI

Each server is a module found by name in SERVERS that defines

    build_server(options: ServerOptions, cfg: BagelConfig, store: ObjectStore | None) -> ModelServer
    load_engine(ckpt: Checkpoint, device: str, dtype: torch.dtype) -> engine

so the LLM server plugs in by adding services/llm/server.py. The port opens first (health NOT_SERVING),
the weights load, then health turns SERVING. SIGTERM / SIGINT start the graceful shutdown; a second
signal cuts the grace period short.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from typing import TYPE_CHECKING

from services.common.rpc import ModelServer, ServerOptions
from services.common.rpc.logs import configure_logging
from services.common.secrets import check_startup
from services.common.storage import ObjectStore, StorageConfig, StorageError

if TYPE_CHECKING:
    import torch
# torch and the checkpoint reader are imported when a server is built, not with this module: the CLI
# imports it to declare `serve`'s options, and the gateway and worker commands must stay slim.

log = logging.getLogger("bagel.serve")

SERVERS = {"vit": "services.vit.server", "vae": "services.vae.server", "llm": "services.llm.server"}
# dtype "auto": float32 on CPU; on a GPU the model's checkpoint dtype, except the AE (stored in fp32).
AUTO_CUDA_DTYPE = {"vit": "bfloat16", "vae": "float32", "llm": "bfloat16"}
DTYPES = ("float32", "bfloat16", "float16")


class ServeError(RuntimeError):
    """The server cannot be started as asked; the message says why."""


def server_module(service: str):
    if service not in SERVERS:
        raise ServeError(f"unknown service {service!r}; choose one of {sorted(SERVERS)}")
    name = SERVERS[service]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ServeError(f"the {service} server is not available in this build ({name} does not exist yet)") from None
    for attr in ("build_server", "load_engine"):
        if not hasattr(module, attr):
            raise ServeError(f"{name} does not define {attr}()")
    return module


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(service: str, dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return getattr(torch, AUTO_CUDA_DTYPE.get(service, "float32") if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ServeError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or auto")
    return getattr(torch, dtype)


def open_store(env=None) -> ObjectStore | None:
    """The object store from BAGEL_S3_* (None when BAGEL_S3_ENDPOINT is unset). An unreachable store is
    logged, not fatal: requests that need it fail with UNAVAILABLE until it is back."""
    cfg = StorageConfig.from_env(env)
    if cfg is None:
        log.info("no object storage configured (BAGEL_S3_ENDPOINT unset): tensors travel inline only")
        return None
    store = ObjectStore(cfg)
    try:
        store.ensure_bucket()
    except StorageError as e:
        log.warning("object storage not reachable at start", extra={"error": str(e)})
    return store


def serve(service: str, port: int = 50051, checkpoint: str | Path | None = None, *, host: str = "127.0.0.1",
          metrics_port: int = 0, tls_cert: str | None = None, tls_key: str | None = None,
          auth_token: str | None = None, max_concurrency: int = 16, max_message_mb: float = 64.0,
          max_images: int = 16, grace_seconds: float = 20.0, drain_seconds: float = 5.0,
          device: str | None = None, dtype: str | torch.dtype | None = "auto", store: ObjectStore | None = None,
          block: bool = True, handle_signals: bool = True) -> ModelServer:
    """Start `service` ("vit", "vae", later "llm"), load its weights, and serve until stopped.

    checkpoint=None uses the embedded tiny default checkpoint. With block=False the started server is
    returned (call .stop()). `store` overrides the BAGEL_S3_* environment."""
    module = server_module(service)
    if checkpoint is None:
        from services.dev.default_model import default_checkpoint_dir

        checkpoint = default_checkpoint_dir()
    from services.common.checkpoint import Checkpoint

    ckpt = Checkpoint(checkpoint)  # json and tensor headers only: fails fast on a bad directory
    device = resolve_device(device)
    torch_dtype = resolve_dtype(service, dtype, device)
    options = ServerOptions(host=host, port=port, max_message_mb=max_message_mb, max_concurrency=max_concurrency,
                            max_images_per_request=max_images, tls_cert=tls_cert, tls_key=tls_key,
                            auth_token=auth_token, metrics_port=metrics_port, drain_seconds=drain_seconds,
                            grace_seconds=grace_seconds)
    server = module.build_server(options, ckpt.config, store if store is not None else open_store())
    server.start()
    if handle_signals and threading.current_thread() is threading.main_thread():
        install_signal_handlers(server)
    try:
        server.load(lambda: module.load_engine(ckpt, device, torch_dtype))
    except BaseException:
        server.stop(grace=0, drain_seconds=0)
        raise
    if block:
        server.wait()
    return server


def install_signal_handlers(server: ModelServer) -> None:
    """First SIGTERM/SIGINT: graceful stop in the background. Second: stop now (grace 0)."""
    signals = {"count": 0}

    def handle(signum, _frame):
        signals["count"] += 1
        graceful = signals["count"] == 1
        log.info("signal", extra={"signal": signal.Signals(signum).name, "graceful": graceful})
        kwargs = {} if graceful else {"grace": 0, "drain_seconds": 0}
        threading.Thread(target=server.stop, kwargs=kwargs, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


# ---- command line --------------------------------------------------------------------------------
def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `serve` subcommand's arguments; pass the parsed namespace to serve_from_args()."""
    parser.add_argument("service", choices=sorted(SERVERS), help="which model server to run")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for all "
                             "interfaces, as in a container)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (logged)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint directory (default: the embedded tiny checkpoint)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port; 0 disables")
    parser.add_argument("--tls-cert", default=None, help="PEM server certificate (with --tls-key)")
    parser.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
    parser.add_argument("--auth-token", default=os.environ.get("BAGEL_AUTH_TOKEN"),
                        help="require `authorization: Bearer <token>` (default: $BAGEL_AUTH_TOKEN; prefer the "
                             "environment or --auth-token-file, which keep the token out of the process list)")
    parser.add_argument("--auth-token-file", default=None, help="read the bearer token from this file")
    parser.add_argument("--max-concurrency", type=int, default=16,
                        help="admitted RPCs at once; more get RESOURCE_EXHAUSTED")
    parser.add_argument("--max-message-mb", type=float, default=64.0, help="largest request/response message")
    parser.add_argument("--max-images", type=int, default=16, help="images or latents per request")
    parser.add_argument("--grace-seconds", type=float, default=20.0, help="time in-flight RPCs get at shutdown")
    parser.add_argument("--drain-seconds", type=float, default=5.0,
                        help="time between health NOT_SERVING and refusing new RPCs at shutdown")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weight dtype")
    parser.add_argument("--log-level", default="INFO")
    return parser


def serve_from_args(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        token = args.auth_token
        if args.auth_token_file:
            token = Path(args.auth_token_file).read_text().strip()
            if not token:  # an empty file must not quietly turn authentication off
                raise ServeError(f"the auth token file {args.auth_token_file} is empty")
        # Before anything is loaded or connected to: a placeholder secret never serves.
        check_startup(f"the {args.service} server", token=token, token_name="the auth token", host=args.host,
                      s3_secret=os.environ.get("BAGEL_S3_SECRET_KEY"))
        serve(args.service, args.port, args.checkpoint, host=args.host, metrics_port=args.metrics_port,
              tls_cert=args.tls_cert, tls_key=args.tls_key, auth_token=token or None,
              max_concurrency=args.max_concurrency, max_message_mb=args.max_message_mb, max_images=args.max_images,
              grace_seconds=args.grace_seconds, drain_seconds=args.drain_seconds, device=args.device,
              dtype=args.dtype)
    except (ServeError, ValueError, OSError) as e:
        log.error("cannot serve", extra={"error": str(e)})
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_serve_arguments(argparse.ArgumentParser(prog="python -m services.serve",
                                                         description="Run a BAGEL model server."))
    return serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
