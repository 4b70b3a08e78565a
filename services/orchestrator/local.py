"""Single-machine mode: the three engines in one process behind the workflow client interfaces."""

from __future__ import annotations

from pathlib import Path

import torch

from services.common.checkpoint import Checkpoint
from services.attention import get_backend
from services.llm.engine import LLMEngine
from services.llm.model import load_llm
from services.llm.sessions import InProcessLLM
from services.orchestrator.workflows import Clients
from services.vae.engine import VAEEngine
from services.vit.engine import ViTEngine


def local_clients(checkpoint_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  attention: str | None = None, kv_cache_tokens: int = 65536) -> Clients:
    """`clients.llm` is an InProcessLLM; its engine (KV cache, model) is `clients.llm.engine`."""
    ckpt = Checkpoint(checkpoint_dir)
    backend = get_backend(attention, device)
    llm = LLMEngine(load_llm(ckpt, dtype=dtype, device=device), ckpt.tokenizer(), attention=backend,
                    kv_cache_tokens=kv_cache_tokens)
    return Clients(vit=ViTEngine.from_checkpoint(ckpt, device, dtype, backend),
                   vae=VAEEngine.from_checkpoint(ckpt, device, dtype), llm=InProcessLLM(llm))
