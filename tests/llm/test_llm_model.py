"""The Qwen2-MoT math: parity with an independent implementation, MoT routing, the sequence layout."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from services.attention import SDPABackend
from services.common.contracts import Controls, ImageParams, TextItem, TextParams, ViTImageItem
from services.llm.engine import Block, LLMEngine
from services.llm.model import load_llm

transformers = pytest.importorskip("transformers")


def plain_attend(mask: torch.Tensor):
    """Attention over the whole packed sequence with an explicit [T, T] visibility mask (no cache)."""
    def attend(i, q, k, v):
        rep = q.shape[1] // k.shape[1]
        qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1).repeat_interleave(rep, 0)[None], \
            v.transpose(0, 1).repeat_interleave(rep, 0)[None]
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)[0].transpose(0, 1)
    return attend


def test_und_path_matches_transformers_qwen3_with_qk_norm(tiny_ckpt):
    """With only und tokens, a MoT layer is a Qwen2 layer with per-head q/k RMSNorm: exactly HF's Qwen3
    with attention biases. Same weights, same logits; proves norms, RoPE, GQA and the MLP."""
    model = load_llm(tiny_ckpt)
    c = model.cfg.llm
    hf_cfg = transformers.Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, attention_bias=True,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False, max_position_embeddings=c.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    ours = {k[len("language_model."):]: v for k, v in model.state_dict().items()
            if k.startswith("language_model.") and "_moe_gen" not in k}
    state = hf.state_dict()
    for k in state:
        state[k] = ours[k] if k in ours else torch.zeros_like(state[k])  # o_proj.bias: BAGEL has none
    hf.load_state_dict(state)
    ids = torch.randint(0, 150000, (1, 23), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(7, 30)  # not starting at 0: RoPE offsets must agree too
    with torch.no_grad():
        want = hf(input_ids=ids, position_ids=positions[None]).logits[0]
        mask = torch.ones(23, 23, dtype=torch.bool).tril()
        hidden = model.language_model(model.embed_text(ids[0]), None, positions, plain_attend(mask))
        got = model.logits(hidden)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cached_blocks_equal_one_uncached_forward_with_the_reference_layout(llm):
    """[text, ViT image, text] through the paged cache == one forward over the whole sequence with
    BAGEL's layout: causal text, bidirectional image block, ONE RoPE position for the image block."""
    tok, model = llm.tok, llm.model
    a, b = tok.encode("a photo of"), tok.encode("what is it?")
    feats = torch.randn(6, model.cfg.vit.hidden_size, generator=torch.Generator().manual_seed(1))
    item = ViTImageItem(feats, (2, 3))
    blocks = [llm.text_block(a), llm.vit_block(item), llm.text_block(b)]
    ctx = llm.cache.new_context()
    try:
        outs = []
        for blk in blocks:
            outs.append(llm._forward([(ctx, blk)], commit=True)[0])
        n = [blk.embeds.shape[0] for blk in blocks]
        assert ctx.rope_position == n[0] + 1 + n[2]  # the image block advanced the counter by exactly 1
    finally:
        llm.cache.free(ctx)
    positions = torch.cat([torch.arange(n[0]), torch.full((n[1],), n[0]), torch.arange(n[0] + 1, n[0] + 1 + n[2])])
    total = sum(n)
    mask = torch.ones(total, total, dtype=torch.bool).tril()
    mask[n[0]:n[0] + n[1], n[0]:n[0] + n[1]] = True  # bidirectional inside the image block
    with torch.no_grad():
        ref = model.language_model(torch.cat([blk.embeds for blk in blocks]), None, positions, plain_attend(mask))
    torch.testing.assert_close(torch.cat(outs), ref, atol=1e-5, rtol=1e-5)


def test_image_block_is_permutation_equivariant(llm):
    """All tokens of an image block share one position and see each other: permuting the tokens
    permutes the outputs. Per-token positions or a causal mask would break this."""
    model = llm.model
    x = torch.randn(8, model.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    outs = []
    for emb in (x, x[perm]):
        ctx = llm.cache.new_context()
        try:
            llm.append([(ctx, llm.text_block(llm.tok.encode("prefix text")))])
            outs.append(llm._forward([(ctx, Block(emb, None, causal=False, image=True))], commit=False)[0])
        finally:
            llm.cache.free(ctx)
    torch.testing.assert_close(outs[1], outs[0][perm], atol=1e-5, rtol=1e-5)


def _perturbed_gen_engine(llm: LLMEngine) -> LLMEngine:
    model = copy.deepcopy(llm.model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_moe_gen" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return LLMEngine(model, llm.tok, attention=SDPABackend(), kv_cache_tokens=8192)


def test_routing_gen_weights_touch_generation_only(llm):
    other = _perturbed_gen_engine(llm)
    feats = torch.randn(4, llm.cfg.vit.hidden_size, generator=torch.Generator().manual_seed(4))
    items = [ViTImageItem(feats, (2, 2)), TextItem("describe")]
    params = TextParams(max_new_tokens=6)
    assert llm.understand(items, params).text == other.understand(items, params).text
    # Hidden states of und tokens are bit-identical, not just the argmax.
    ctx_a, ctx_b = llm.cache.new_context(), other.cache.new_context()
    try:
        ha = llm._forward([(ctx_a, llm.vit_block(items[0]))], commit=True)[0]
        hb = other._forward([(ctx_b, other.vit_block(items[0]))], commit=True)[0]
        assert torch.equal(ha, hb)
    finally:
        llm.cache.free(ctx_a)
        other.cache.free(ctx_b)
    img = ImageParams(width=64, height=64, num_timesteps=3, seed=0)
    lat_a = llm.generate_image([TextItem("a cat")], img).latent
    lat_b = other.generate_image([TextItem("a cat")], img).latent
    assert (lat_a - lat_b).abs().max() > 1e-3


def test_routing_sends_only_latent_tokens_to_gen_weights(llm):
    """In a VAE block the two markers are und tokens: perturbing gen weights leaves their hidden
    states unchanged in the first layer's und path but changes the latent tokens'."""
    other = _perturbed_gen_engine(llm)
    latent = torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(6))
    from services.common.contracts import VAEImageItem

    blk_a, blk_b = llm.vae_block(VAEImageItem(latent)), other.vae_block(VAEImageItem(latent))
    assert blk_a.is_gen.tolist() == [False] + [True] * 4 + [False]
    # Embeddings agree (vae2llm / time / position modules are shared, not routed).
    torch.testing.assert_close(blk_a.embeds, blk_b.embeds)
    ctx_a, ctx_b = llm.cache.new_context(), other.cache.new_context()
    try:
        ha = llm._forward([(ctx_a, blk_a)], commit=True)[0]
        hb = other._forward([(ctx_b, blk_b)], commit=True)[0]
    finally:
        llm.cache.free(ctx_a)
        other.cache.free(ctx_b)
    assert (ha[1:-1] - hb[1:-1]).abs().max() > 1e-3
    assert (ha[[0, -1]] - hb[[0, -1]]).abs().max() > 0  # markers attend to changed latents, so they move too
    del other


def test_progress_reports_tokens(llm):
    seen = []
    llm.understand([TextItem("hello")], TextParams(max_new_tokens=4), controls=Controls(on_progress=seen.append))
    assert [p.step for p in seen] == list(range(1, len(seen) + 1)) and seen and seen[-1].total == 4
