"""Everything a model server is configured with; the CLI's flags map onto these fields one to one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"           # loopback unless told otherwise; 0.0.0.0 in containers
    port: int = 50051                 # 0 = any free port (the bound one is returned by start())
    # Largest request or response message. Images ride in messages: 64 MiB holds a couple of
    # full-size photos plus a 980 px image's fp32 ViT features of the published model (~22 MiB).
    max_message_mb: float = 64.0
    # RPCs admitted at once (running or waiting for the model); beyond it: RESOURCE_EXHAUSTED at once,
    # so an overloaded replica sheds load instead of queueing until deadlines pass.
    max_concurrency: int = 16
    max_images_per_request: int = 16  # per Encode / Decode call
    tls_cert: str | None = None       # PEM files; both or neither
    tls_key: str | None = None
    auth_token: str | None = None     # clients send `authorization: Bearer <token>`; None = no check
    metrics_port: int = 0             # Prometheus /metrics on its own HTTP port; 0 = disabled
    metrics_host: str | None = None   # None: the same as `host`
    # Shutdown: health goes NOT_SERVING, requests keep flowing for drain_seconds while load balancers
    # take the pod out, then the server stops accepting and gives in-flight RPCs grace_seconds.
    # 5 + 20 s stays under Kubernetes' default 30 s terminationGracePeriodSeconds.
    drain_seconds: float = 5.0
    grace_seconds: float = 20.0

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key file")
        if self.max_message_mb <= 0 or self.max_concurrency < 1 or self.max_images_per_request < 1:
            raise ValueError("max_message_mb, max_concurrency and max_images_per_request must be positive")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("the auth token is empty")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)
