"""Which attention backend runs: the one place that maps a name to an implementation.

Each backend is described by a `BackendSpec` whose implementation is a "module:attribute" string,
imported the first time that backend is asked for. So choosing `sdpa` never imports triton, a backend
whose dependencies are missing fails only when it is chosen, and nothing registers itself as a side
effect of being imported.

Default: `triton` on CUDA (when it can be imported), `sdpa` everywhere else; the environment variable
BAGEL_ATTENTION_BACKEND overrides the default, a name passed to `get_backend` overrides both.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from types import MappingProxyType

import torch

from services.attention.base import AttentionBackend, BackendUnavailable

log = logging.getLogger(__name__)

ENV_VAR = "BAGEL_ATTENTION_BACKEND"


@dataclass(frozen=True)
class BackendSpec:
    """A backend by name: where its implementation lives and what it is for."""

    name: str
    target: str   # "module:attribute" of a class whose instances are AttentionBackends
    summary: str

    def load(self) -> type:
        """Import the implementation (first use only; Python caches the module)."""
        module, _, attr = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise BackendUnavailable(f"attention backend {self.name!r} cannot be imported here: {e}") from e


BACKENDS = MappingProxyType({spec.name: spec for spec in [
    BackendSpec("sdpa", "services.attention.sdpa:SDPABackend",
                "torch scaled_dot_product_attention, one call per sequence: the reference, runs everywhere"),
    BackendSpec("triton", "services.attention.triton.backend:TritonBackend",
                "Triton kernels reading the paged cache through block tables: CUDA, or the Triton interpreter"),
]})


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def _spec(name: str) -> BackendSpec:
    spec = BACKENDS.get(name)
    if spec is None:
        raise ValueError(f"unknown attention backend {name!r}; known backends: {', '.join(backend_names())}")
    return spec


def default_backend_name(device: torch.device | str) -> str:
    """BAGEL_ATTENTION_BACKEND when set; otherwise triton on CUDA (if importable), sdpa elsewhere."""
    chosen = os.environ.get(ENV_VAR)
    if chosen:
        return chosen
    if torch.device(device).type == "cuda":
        try:
            BACKENDS["triton"].load()
            return "triton"
        except BackendUnavailable as e:  # the SDPA reference still works
            log.warning("%s; using sdpa", e)
    return "sdpa"


def get_backend(name: str | None = None, device: torch.device | str = "cpu") -> AttentionBackend:
    """A new instance of the backend `name`, or of the default for `device` when name is None.

    Raises ValueError for a name that is not in BACKENDS, BackendUnavailable for one that cannot run in
    this process (its package missing; triton without a GPU or the interpreter)."""
    backend = _spec(name or default_backend_name(device)).load()()
    log.info("attention backend: %s", backend.name)
    return backend
