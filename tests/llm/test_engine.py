"""The engine's workflows on the tiny model: CFG contexts, batching, seeds, cancellation, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from services.attention import SDPABackend
from services.common.images import ImageError
from services.llm.engine import CFGContexts, GENERATE_THINK_PROMPT, LLMEngine
from services.common.contracts import (Cancelled, Controls, ImageParams, InputError, TextItem, TextParams,
                                       VAEImageItem, ViTImageItem)
from services.orchestrator import workflows as wf


def edit_items(llm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [VAEImageItem(torch.randn(16, 8, 8, generator=g)),
            ViTImageItem(torch.randn(6, llm.cfg.vit.hidden_size, generator=g), (2, 3)), TextItem("make it blue")]


class RecordingSDPA(SDPABackend):
    """The reference backend, remembering how many sequences each forward packed."""

    def __init__(self):
        self.batches: list[int] = []

    def paged_attention(self, q, k_new, v_new, k_cache, v_cache, meta, scale):
        self.batches.append(meta.num_seqs)
        return super().paged_attention(q, k_new, v_new, k_cache, v_cache, meta, scale)


@pytest.fixture()
def recording(llm):
    rec = RecordingSDPA()
    eng = LLMEngine(llm.model, llm.tok, attention=rec, kv_cache_tokens=16384)
    yield eng, rec
    assert eng.cache.blocks_in_use == 0


# ---- the three CFG contexts -------------------------------------------------------------------------
def test_edit_contexts_hold_what_the_reference_puts_in_them(llm):
    items = edit_items(llm)
    n_vae, n_vit = 16 + 2, 6 + 2
    n_text = len(llm.tok.encode("make it blue")) + 2
    ctxs = llm.build_cfg_contexts(items, need_notext=True, need_noimg=True)
    try:
        assert ctxs.cond.length == n_vae + n_vit + n_text and ctxs.cond.rope_position == 1 + 1 + n_text
        assert ctxs.notext.length == n_vae + n_vit and ctxs.notext.rope_position == 2  # images only
        assert ctxs.noimg.length == n_text and ctxs.noimg.rope_position == n_text       # text only
        assert ctxs.notext.blocks[0] == ctxs.cond.blocks[0]  # a prefix of cond: shared, not copied
    finally:
        llm.free(ctxs)


def test_three_branches_really_differ(llm):
    """Fails if the no-text or no-image branch reuses the full context (the bug that makes images
    ignore their prompt)."""
    ctxs = llm.build_cfg_contexts(edit_items(llm), need_notext=True, need_noimg=True)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    params = ImageParams.for_edit(64, 64)
    try:
        v = {}
        for name, c in (("cond", ctxs.cond), ("notext", ctxs.notext), ("noimg", ctxs.noimg)):
            only = CFGContexts(c, None, None)
            v[name] = llm.denoise_step(x, 0.5, only, 4, 4, ImageParams(width=64, height=64, cfg_text_scale=1.0))
        assert (v["cond"] - v["notext"]).abs().max() > 1e-3
        assert (v["cond"] - v["noimg"]).abs().max() > 1e-3
        assert (v["notext"] - v["noimg"]).abs().max() > 1e-3
        guided = llm.denoise_step(x, 0.5, ctxs, 4, 4, params)
        broken = llm.denoise_step(x, 0.5, CFGContexts(ctxs.cond, ctxs.cond, ctxs.cond), 4, 4, params)
        assert (guided - broken).abs().max() > 1e-3
    finally:
        llm.free(ctxs)


def test_text_to_image_no_text_branch_is_empty_at_position_zero(llm):
    ctxs = llm.build_cfg_contexts([TextItem("a red fox")], need_notext=True, need_noimg=True)
    try:
        assert ctxs.notext.length == 0 and ctxs.notext.rope_position == 0
        assert ctxs.cond.rope_position == len(llm.tok.encode("a red fox")) + 2
        assert ctxs.noimg_is_cond()  # no input image: the no-image context is cond itself
    finally:
        llm.free(ctxs)


def test_think_system_prompt_goes_to_cond_and_noimg_and_the_later_notext(llm):
    sys_len = len(llm.tok.encode(GENERATE_THINK_PROMPT)) + 2
    ctxs = llm.build_cfg_contexts(edit_items(llm), need_notext=True, need_noimg=True,
                                  system_prompt=GENERATE_THINK_PROMPT)
    try:
        assert ctxs.noimg.length == sys_len + len(llm.tok.encode("make it blue")) + 2
        assert ctxs.notext.length == sys_len + 18 + 8
    finally:
        llm.free(ctxs)


# ---- batching ---------------------------------------------------------------------------------------
def test_batched_cfg_equals_branch_by_branch(recording):
    eng, rec = recording
    items = edit_items(eng)
    params = ImageParams.for_edit(64, 64, num_timesteps=4, seed=3)
    rec.batches.clear()
    batched = eng.generate_image(items, params).latent
    per_forward = rec.batches[-3 * eng.cfg.llm.num_hidden_layers:]
    assert set(per_forward) == {3}  # all three branches in one forward
    sequential = eng.generate_image(items, params, batch_cfg=False).latent
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=1e-5)


def test_cfg_interval_decides_which_steps_run_guidance(recording):
    eng, rec = recording
    layers = eng.cfg.llm.num_hidden_layers
    base = dict(width=32, height=32, num_timesteps=6, seed=0, timestep_shift=1.0)
    rec.batches.clear()
    eng.generate_image([TextItem("cat")], ImageParams(**base, cfg_interval=(0.5, 1.0)))
    per_step = rec.batches[-5 * layers::layers]
    # t = 1, .8, .6, .4, .2: guided (2 branches) only while 0.5 < t <= 1
    assert per_step == [2, 2, 2, 1, 1]
    never = eng.generate_image([TextItem("cat")], ImageParams(**base, cfg_interval=(1.0, 1.0))).latent
    unguided = eng.generate_image([TextItem("cat")], ImageParams(**base, cfg_text_scale=1.0)).latent
    always = eng.generate_image([TextItem("cat")], ImageParams(**base, cfg_interval=(0.0, 1.0))).latent
    assert torch.equal(never, unguided)
    assert (always - never).abs().max() > 1e-3


def test_unused_image_branch_is_skipped_without_changing_the_result(recording):
    eng, rec = recording
    layers = eng.cfg.llm.num_hidden_layers
    params = ImageParams(width=32, height=32, num_timesteps=3, seed=1, cfg_img_scale=1.0, cfg_interval=(0.0, 1.0))
    rec.batches.clear()
    eng.generate_image([TextItem("dog")], params)
    assert set(rec.batches[-2 * layers:]) == {2}


# ---- seeds ------------------------------------------------------------------------------------------
def test_seed_means_the_reference_noise(llm):
    p = ImageParams(width=48, height=32, num_timesteps=3, seed=1234)
    noise, seed = llm.initial_noise(p)
    assert seed == 1234
    assert torch.equal(noise, torch.randn((6, 64), generator=torch.Generator("cpu").manual_seed(1234)))
    a = llm.generate_image([TextItem("x")], p).latent
    b = llm.generate_image([TextItem("x")], p).latent
    c = llm.generate_image([TextItem("x")], ImageParams(width=48, height=32, num_timesteps=3, seed=1235)).latent
    explicit = llm.generate_image([TextItem("x")], ImageParams(width=48, height=32, num_timesteps=3,
                                                                noise=noise)).latent
    assert torch.equal(a, b) and torch.equal(a, explicit)
    assert (a - c).abs().max() > 1e-3
    assert a.shape == (16, 4, 6)


def test_sampled_decoding_is_reproducible_with_a_seed(llm):
    p = TextParams(max_new_tokens=8, do_sample=True, temperature=1.0, seed=9)
    a = llm.understand([TextItem("tell me")], p).text
    assert a == llm.understand([TextItem("tell me")], p).text
    others = {llm.understand([TextItem("tell me")], TextParams(max_new_tokens=8, do_sample=True, temperature=1.0,
                                                                seed=s)).text for s in range(4)}
    assert len(others) > 1


# ---- decoding ---------------------------------------------------------------------------------------
def test_decoding_stops_at_im_end_and_never_returns_it(llm):
    model = copy.deepcopy(llm.model)
    calls = {"n": 0}
    real = model.logits

    def scripted(hidden):
        calls["n"] += 1
        out = real(hidden)
        out[:] = -1e4
        out[llm.tok.eos_id if calls["n"] == 4 else 9707] = 1e4  # 3 x "Hello", then <|im_end|>
        return out

    model.logits = scripted
    eng = LLMEngine(model, llm.tok, attention=SDPABackend(), kv_cache_tokens=4096)
    res = eng.understand([TextItem("hi")], TextParams(max_new_tokens=50))
    assert res.tokens == 3 and res.text == "HelloHelloHello"
    assert calls["n"] == 4 and eng.cache.blocks_in_use == 0


def test_think_mode_retokenizes_the_thought_into_cond_only(llm):
    p = ImageParams(width=32, height=32, num_timesteps=3, seed=5)
    plain = llm.generate_image([TextItem("a boat")], p)
    thought = llm.generate_image([TextItem("a boat")], p, think=True, think_params=TextParams(max_new_tokens=5))
    assert plain.think is None and isinstance(thought.think, str) and thought.think
    assert (plain.latent - thought.latent).abs().max() > 1e-4


# ---- cancellation -----------------------------------------------------------------------------------
def test_cancel_stops_between_steps_and_frees_blocks(llm, cancel_at_step):
    controls, steps = cancel_at_step(2)
    with pytest.raises(Cancelled):
        llm.generate_image(edit_items(llm), ImageParams.for_edit(64, 64, num_timesteps=10, seed=0), controls=controls)
    assert steps == [1, 2]
    assert llm.cache.blocks_in_use == 0


def test_cancel_stops_decoding(llm):
    controls = Controls()
    controls.on_progress = lambda p: controls.cancel.set() if p.step == 3 else None
    with pytest.raises(Cancelled):
        llm.understand([TextItem("go")], TextParams(max_new_tokens=100), controls=controls)
    assert llm.cache.blocks_in_use == 0


# ---- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    (dict(width=1000), "width must be a positive multiple of 16"),
    (dict(height=1040), "height must be a positive multiple of 16 up to 1024"),
    (dict(width=0), "width"),
    (dict(num_timesteps=-5), "num_timesteps"),
    (dict(cfg_renorm_type="nope"), "cfg_renorm_type"),
    (dict(cfg_interval=(0.8, 0.2)), "cfg_interval"),
    (dict(cfg_text_scale=-1.0), "cfg_text_scale"),
    (dict(noise=torch.zeros(3, 64)), "noise must have shape"),
])
def test_bad_image_parameters_are_refused(llm, overrides, match):
    with pytest.raises(InputError, match=match):
        llm.generate_image([TextItem("x")], ImageParams(**{**dict(width=64, height=64), **overrides}))


@pytest.mark.parametrize("w,h", [(0, 512), (512, 0), (-16, 512), (1000, 512), (512, 1040), (1040, 1040),
                                 (512.0, 512), (True, 512)])
def test_generation_size_refused(llm, w, h):
    with pytest.raises(InputError, match="width|height"):
        ImageParams(width=w, height=h).validate(llm.cfg)


@pytest.mark.parametrize("w,h", [(1024, 576), (1024, 1024), (16, 16), (768, 1024)])
def test_generation_size_accepted(llm, w, h):
    ImageParams(width=w, height=h).validate(llm.cfg)


@pytest.mark.parametrize("params, match", [
    (TextParams(max_new_tokens=0), "max_new_tokens"),
    (TextParams(do_sample=True, temperature=0.0), "temperature"),
    (TextParams(top_p=1.5), "top_p"),
])
def test_bad_text_parameters_are_refused(llm, params, match):
    with pytest.raises(InputError, match=match):
        llm.understand([TextItem("x")], params)


def test_prompt_over_the_context_limit_is_refused_before_any_work(llm):
    long_prompt = "token " * (llm.max_context_tokens + 10)
    before = llm.forward_count
    with pytest.raises(InputError, match="context tokens; the limit is"):
        llm.generate_image([TextItem(long_prompt)], ImageParams(width=32, height=32))
    with pytest.raises(InputError, match="limit"):
        llm.understand([TextItem(long_prompt)])
    assert llm.forward_count == before


def test_bad_context_items_are_refused(llm):
    with pytest.raises(InputError, match="ViT features"):
        llm.understand([ViTImageItem(torch.zeros(5, llm.cfg.vit.hidden_size), (2, 3))])
    with pytest.raises(InputError, match="latent"):
        llm.generate_image([VAEImageItem(torch.zeros(16, 7, 8)), TextItem("x")], ImageParams(width=32, height=32))
    with pytest.raises(InputError, match="exceeds"):
        llm.generate_image([VAEImageItem(torch.zeros(16, 130, 8)), TextItem("x")], ImageParams(width=32, height=32))


def test_unreadable_and_zero_size_images_are_refused(clients):
    from services.common.images import load_image

    with pytest.raises(ImageError):
        load_image(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageError, match="zero size"):
        wf.understand(clients, Image.new("RGB", (0, 0)), "what?")
    with pytest.raises(ImageError, match="zero size"):
        wf.edit(clients, Image.new("RGB", (10, 0)), "what?")


# ---- whole workflows --------------------------------------------------------------------------------
def small_picture():
    yy, xx = np.mgrid[0:32, 0:48]
    return Image.fromarray(np.stack([xx * 5, yy * 7, np.full_like(xx, 90)], -1).astype(np.uint8))


def test_understand_workflow_uses_the_vae_resize_first(clients):
    seen = []
    real = clients.vit.encode
    clients.vit.encode = lambda images: seen.extend(im.size for im in images) or real(images)
    try:
        res = wf.understand(clients, small_picture(), "What is this?", TextParams(max_new_tokens=3))
    finally:
        clients.vit.encode = real
    assert seen == [(768, 512)]  # 48x32 -> VAE resize (1024, 512, 16) -> 768x512
    assert res.tokens == 3


def test_edit_workflow_output_has_the_resized_input_size(clients):
    out = wf.edit(clients, small_picture(), "brighter", wf.edit_params(small_picture(), num_timesteps=2, seed=0))
    assert out.pixels.shape == (512, 768, 3) and out.pixels.dtype == np.uint8
    assert out.latent.shape == (16, 64, 96) and out.seed == 0
