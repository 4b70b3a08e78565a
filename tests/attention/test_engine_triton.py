"""The whole engine on the Triton backend (interpreted on the CPU) against the SDPA reference: same
tokens, same latents, on the tiny preset (head_dim 16, GQA 2:1, paged contexts shared by CFG forks)."""

from __future__ import annotations

import pytest
import torch

from services.attention import SDPABackend, get_backend
from services.llm.engine import LLMEngine
from services.common.contracts import ImageParams, TextItem, TextParams, VAEImageItem, ViTImageItem


@pytest.fixture(scope="module")
def engines(llm):
    triton = get_backend("triton")
    assert triton.name == "triton"
    return (LLMEngine(llm.model, llm.tok, attention=SDPABackend(), kv_cache_tokens=8192, block_size=16),
            LLMEngine(llm.model, llm.tok, attention=triton, kv_cache_tokens=8192, block_size=16))


def items(llm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [VAEImageItem(torch.randn(16, 6, 4, generator=g)),
            ViTImageItem(torch.randn(6, llm.cfg.vit.hidden_size, generator=g), (3, 2)), TextItem("make it blue")]


def test_understanding_tokens_match(engines, llm):
    sdpa, triton = engines
    q = [items(llm)[1], TextItem("what is in the picture?")]
    params = TextParams(max_new_tokens=6)
    assert triton.understand(q, params).text == sdpa.understand(q, params).text


def test_generation_and_edit_latents_match(engines, llm):
    sdpa, triton = engines
    t2i = ImageParams(width=48, height=32, num_timesteps=3, seed=1, cfg_img_scale=2.0)
    a = sdpa.generate_image([TextItem("a small red boat")], t2i).latent
    b = triton.generate_image([TextItem("a small red boat")], t2i).latent
    torch.testing.assert_close(b, a, atol=2e-4, rtol=2e-4)
    edit = ImageParams.for_edit(32, 48, num_timesteps=3, seed=2)
    a = sdpa.generate_image(items(llm), edit).latent
    b = triton.generate_image(items(llm), edit).latent
    torch.testing.assert_close(b, a, atol=2e-4, rtol=2e-4)
    assert sdpa.cache.blocks_in_use == 0 and triton.cache.blocks_in_use == 0
