"""services/common/contracts/messages.py: parameters <-> bagel.v1 messages, the one conversion every
side (LLM server, gateway, gRPC clients) uses. Pure functions, no servers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.common.config import preset
from services.common.contracts import ImageParams, InputError, TextParams, messages
from services.common.protos import common_pb2, llm_pb2

CFG = preset("bagel-7b-mot")


# ---- text params -------------------------------------------------------------------------------------
def test_unset_text_fields_take_the_defaults_and_the_given_budget():
    assert messages.text_params(llm_pb2.TextParams(), 512) == TextParams(max_new_tokens=512)
    assert messages.text_params(llm_pb2.TextParams(), 1000) == TextParams(max_new_tokens=1000)
    p = messages.text_params(llm_pb2.TextParams(), 512)
    assert (p.do_sample, p.temperature, p.top_p, p.seed) == (False, 0.3, 1.0, None)


def test_set_text_fields_override_and_zero_values_count_as_set():
    msg = llm_pb2.TextParams(max_new_tokens=7, do_sample=True, temperature=0.5, top_p=0.25, seed=0)
    assert messages.text_params(msg, 512) == TextParams(max_new_tokens=7, do_sample=True, temperature=0.5,
                                                        top_p=0.25, seed=0)
    # do_sample=False set explicitly is kept, and the seed stays unset
    p = messages.text_params(llm_pb2.TextParams(do_sample=False), 512)
    assert p.do_sample is False and p.seed is None


@pytest.mark.parametrize("msg, match", [
    (llm_pb2.TextParams(max_new_tokens=0), "max_new_tokens"),
    (llm_pb2.TextParams(max_new_tokens=10**7), "max_new_tokens"),
    (llm_pb2.TextParams(do_sample=True, temperature=0.0), "temperature"),
    (llm_pb2.TextParams(top_p=0.0), "top_p"),
    (llm_pb2.TextParams(top_p=1.5), "top_p"),
])
def test_out_of_range_text_params_are_input_errors(msg, match):
    with pytest.raises(InputError, match=match):
        messages.text_params(msg, 512)


def test_text_params_message():
    assert messages.text_params_message(None) is None
    msg = messages.text_params_message(TextParams(max_new_tokens=9, do_sample=True, temperature=0.5, top_p=0.5))
    assert (msg.max_new_tokens, msg.do_sample, msg.temperature, msg.top_p) == (9, True, 0.5, 0.5)
    assert not msg.HasField("seed")
    back = messages.text_params(messages.text_params_message(TextParams(max_new_tokens=3, temperature=0.5,
                                                                        seed=11)), 512)
    assert back == TextParams(max_new_tokens=3, temperature=0.5, seed=11)


# ---- image params --------------------------------------------------------------------------------------
def test_generate_preset_is_the_reference_defaults():
    p = messages.image_params(llm_pb2.ImageParams(preset=llm_pb2.IMAGE_PRESET_GENERATE), CFG)
    assert p == ImageParams()
    assert (p.width, p.height, p.cfg_text_scale, p.cfg_img_scale, p.cfg_interval, p.cfg_renorm_type,
            p.timestep_shift, p.num_timesteps) == (1024, 1024, 4.0, 1.0, (0.4, 1.0), "global", 3.0, 50)


def test_edit_preset_takes_the_input_size_or_1024():
    p = messages.image_params(llm_pb2.ImageParams(preset=llm_pb2.IMAGE_PRESET_EDIT), CFG, (688, 512))
    assert p == ImageParams.for_edit(688, 512)
    assert (p.cfg_img_scale, p.cfg_interval, p.cfg_renorm_type) == (2.0, (0.0, 1.0), "text_channel")
    p = messages.image_params(llm_pb2.ImageParams(preset=llm_pb2.IMAGE_PRESET_EDIT), CFG)
    assert (p.width, p.height) == (1024, 1024)


def test_unspecified_preset_follows_the_input_image():
    msg = llm_pb2.ImageParams()
    assert messages.image_params(msg, CFG, (512, 768), has_input_image=True) == ImageParams.for_edit(512, 768)
    assert messages.image_params(msg, CFG, None, has_input_image=False) == ImageParams()


def test_set_image_fields_override_the_preset():
    msg = llm_pb2.ImageParams(preset=llm_pb2.IMAGE_PRESET_EDIT, width=256, height=512, cfg_text_scale=6.0,
                              cfg_img_scale=1.5, cfg_renorm_min=0.25, timestep_shift=1.0, num_timesteps=12,
                              seed=0)
    p = messages.image_params(msg, CFG, (688, 512))
    assert (p.width, p.height, p.cfg_text_scale, p.cfg_img_scale, p.cfg_renorm_min, p.timestep_shift,
            p.num_timesteps, p.seed) == (256, 512, 6.0, 1.5, 0.25, 1.0, 12, 0)
    assert p.cfg_renorm_type == "text_channel"  # unset: still the preset's


def test_a_partial_cfg_interval_keeps_the_presets_other_end():
    gen = llm_pb2.IMAGE_PRESET_GENERATE
    assert messages.image_params(llm_pb2.ImageParams(preset=gen, cfg_interval_lo=0.5), CFG).cfg_interval == (0.5, 1.0)
    assert messages.image_params(llm_pb2.ImageParams(preset=gen, cfg_interval_hi=0.75),
                                 CFG).cfg_interval == (0.4, 0.75)
    edit = llm_pb2.ImageParams(preset=llm_pb2.IMAGE_PRESET_EDIT, cfg_interval_hi=0.5)
    assert messages.image_params(edit, CFG, (512, 512)).cfg_interval == (0.0, 0.5)
    with pytest.raises(InputError, match="cfg_interval"):
        messages.image_params(llm_pb2.ImageParams(preset=gen, cfg_interval_lo=0.5, cfg_interval_hi=0.25), CFG)


@pytest.mark.parametrize("enum, name", [(llm_pb2.CFG_RENORM_TYPE_GLOBAL, "global"),
                                        (llm_pb2.CFG_RENORM_TYPE_CHANNEL, "channel"),
                                        (llm_pb2.CFG_RENORM_TYPE_TEXT_CHANNEL, "text_channel")])
def test_renorm_enums_map_to_names(enum, name):
    assert messages.image_params(llm_pb2.ImageParams(cfg_renorm_type=enum), CFG).cfg_renorm_type == name
    assert messages.RENORM_ENUMS[name] == enum


def test_unknown_enums_are_refused():
    with pytest.raises(InputError, match="cfg_renorm_type"):
        messages.image_params(llm_pb2.ImageParams(cfg_renorm_type=99), CFG)
    with pytest.raises(InputError, match="preset"):
        messages.image_params(llm_pb2.ImageParams(preset=42), CFG)


@pytest.mark.parametrize("msg, match", [
    (llm_pb2.ImageParams(width=1000), "width"),
    (llm_pb2.ImageParams(height=4096), "height"),
    (llm_pb2.ImageParams(num_timesteps=1), "num_timesteps"),
    (llm_pb2.ImageParams(timestep_shift=0.0), "timestep_shift"),
    (llm_pb2.ImageParams(cfg_text_scale=101.0), "cfg_text_scale"),
    (llm_pb2.ImageParams(cfg_renorm_min=2.0), "cfg_renorm_min"),
])
def test_out_of_range_image_params_are_input_errors(msg, match):
    with pytest.raises(InputError, match=match):
        messages.image_params(msg, CFG)


def same_params(a: ImageParams, b: ImageParams) -> bool:
    """Equal, up to the float32 of the message's float fields (0.4 comes back as 0.4000000059604645)."""
    floats = ("cfg_text_scale", "cfg_img_scale", "cfg_renorm_min", "timestep_shift")
    exact = ("width", "height", "cfg_renorm_type", "num_timesteps", "seed", "noise")
    return (all(getattr(a, f) == getattr(b, f) for f in exact)
            and all(getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-6) for f in floats)
            and list(a.cfg_interval) == pytest.approx(list(b.cfg_interval), rel=1e-6))


ROUND_TRIP = {
    "generate defaults": ImageParams(),
    "edit defaults": ImageParams.for_edit(688, 512),
    "everything set": ImageParams(  # float32-exact, so also plainly equal (checked below)width=512, height=256, cfg_text_scale=5.5, cfg_img_scale=1.25,
                                  cfg_interval=(0.25, 0.75), cfg_renorm_min=0.5, cfg_renorm_type="channel",
                                  timestep_shift=2.0, num_timesteps=8, seed=1234),
    "seed zero": ImageParams(width=64, height=64, num_timesteps=2, seed=0),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_image_params_round_trip(name):
    p = ROUND_TRIP[name]
    msg = messages.image_params_message(p)
    # every field is set, so neither the preset nor the input size can change it
    assert same_params(messages.image_params(msg, CFG), p)
    assert same_params(messages.image_params(msg, CFG, (1024, 512), has_input_image=True), p)
    assert not same_params(messages.image_params(msg, CFG), replace(p, num_timesteps=p.num_timesteps + 1))
    assert msg.HasField("seed") == (p.seed is not None)


def test_float32_exact_params_round_trip_plainly_equal():
    p = ROUND_TRIP["everything set"]
    assert messages.image_params(messages.image_params_message(p), CFG) == p


def test_latent_size_is_the_latents_image_size():
    assert messages.latent_size((16, 4, 6), 8) == common_pb2.ImageSize(width=48, height=32)
    assert messages.latent_size((16, 32, 43), 16) == common_pb2.ImageSize(width=688, height=512)
