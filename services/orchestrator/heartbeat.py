"""Which workers are consuming the job queue: each worker process keeps a key `bagel:workers:{hostname}`
alive in Redis (refreshed every HEARTBEAT_S, expiring after three times that), and the gateway's
readiness counts the live keys. A worker killed without a goodbye drops out when its key expires.

Only Redis here, so the gateway can import it and stay torch-free."""

from __future__ import annotations

import logging
import threading

import redis

log = logging.getLogger("bagel.worker")

WORKER_KEY_PREFIX = "bagel:workers:"
HEARTBEAT_S = 5.0


def live_workers(r: redis.Redis) -> int:
    """How many workers have refreshed their key within its expiry."""
    return sum(1 for _ in r.scan_iter(match=WORKER_KEY_PREFIX + "*", count=100))


class Heartbeat:
    """A daemon thread that refreshes one worker's key until stop(), which deletes it."""

    def __init__(self, r: redis.Redis, hostname: str, interval_s: float = HEARTBEAT_S):
        self.r, self.key, self.interval_s = r, WORKER_KEY_PREFIX + hostname, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                # 3x the interval: one missed refresh (a slow Redis) does not make the worker disappear.
                self.r.set(self.key, "1", ex=max(1, round(3 * self.interval_s)))
            except redis.RedisError as e:
                log.warning("worker heartbeat not written: %s", e)
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.r.delete(self.key)  # gone at once on a clean shutdown, not after the expiry
        except redis.RedisError:
            pass
