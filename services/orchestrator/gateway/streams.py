"""Open waiting requests per client, over both fronts: gRPC Run / Watch, HTTP long polls, event streams and
synchronous OpenAI calls. Each holds a Redis subscription (or a share of one) and a server slot for as long
as it lasts, so one client must not hold them all. A client is its bearer token when auth is on, else its
address (IP, whatever the port)."""

from __future__ import annotations

import hashlib

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from services.common.contracts import ResourceExhausted


class TooManyStreams(ResourceExhausted):
    """The client already has its limit of open waiting requests (429 / RESOURCE_EXHAUSTED)."""


class ClientStreams:
    """Counts per client. A plain lock, held only to update the count: the gRPC front calls from its thread
    pool, the HTTP front from the event loop (never across an await), so one object serves both."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """One open waiting request of `client` for the length of the block; TooManyStreams past the limit."""
        with self._lock:
            if self._open[client] >= self.limit:
                raise TooManyStreams(f"this client already has {self.limit} open waiting requests (streams, "
                                     "long polls, synchronous calls); close one or retry later")
            self._open[client] += 1
        try:
            yield
        finally:  # however the request ends: answered, failed, cancelled, client gone
            with self._lock:
                self._open[client] -= 1
                if not self._open[client]:
                    del self._open[client]  # no entry kept per address ever seen

    def open(self, client: str) -> int:
        with self._lock:
            return self._open.get(client, 0)


def client_key(token: str | None, address: str | None) -> str:
    """The peer's address, and with auth its token too: callers that share the deployment's one token
    are still told apart by where they call from. The token is kept only as a short hash."""
    where = f"address:{address or 'unknown'}"
    if not token:
        return where
    return f"token:{hashlib.sha256(token.encode()).hexdigest()[:16]}/{where}"


def grpc_peer_address(peer: str) -> str:
    """"ipv4:127.0.0.1:5000" -> "127.0.0.1", "ipv6:[::1]:5000" -> "::1"; other forms (unix:...) as they are."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host = rest.rpartition(":")[0]
    return host.strip("[]")
