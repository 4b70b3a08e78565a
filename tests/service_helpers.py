"""Small helpers shared by the service tests (images, status assertions, metrics scraping)."""

from __future__ import annotations

import io
import time
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def expect_status(code: grpc.StatusCode, fn, *args, match: str | None = None, **kwargs) -> grpc.RpcError:
    """Call fn and assert it fails with `code` (and `match` in the details)."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    if match is not None:
        assert match in (err.details() or ""), f"{match!r} not in {err.details()!r}"
    return err


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_value(text: str, name: str, **labels) -> float:
    """The value of one sample of the Prometheus text format, 0.0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return 0.0


def llm_kv_blocks_left(llm_server, timeout: float = 10.0) -> int:
    """KV blocks the LLM server still holds once it has dropped cancelled requests (it does so at its
    next step), or after `timeout` seconds."""
    engine = llm_server.slot.peek()
    deadline = time.monotonic() + timeout
    while engine.cache.blocks_in_use and time.monotonic() < deadline:
        time.sleep(0.05)
    return engine.cache.blocks_in_use
