"""Sampler math against direct computations: schedule, CFG interval, the three renorms, token sampling."""

from __future__ import annotations

import math

import pytest
import torch

from services.llm.flow import apply_cfg, cfg_active, sample_token, timestep_schedule


def vecs(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(10, 64, generator=g) * s for s in (1.0, 0.7, 1.3)]


def test_schedule_is_shifted_linspace_with_n_minus_1_steps():
    t, dt = timestep_schedule(50, 3.0)
    assert len(t) == 49 and len(dt) == 49
    for i in (0, 10, 48):
        raw = 1 - i / 49
        assert t[i].item() == pytest.approx(3 * raw / (1 + 2 * raw), abs=1e-6)
    assert t[0].item() == pytest.approx(1.0)
    assert dt.sum().item() == pytest.approx(1.0, abs=1e-6)  # Euler integrates from t=1 down to t=0
    assert (dt > 0).all()


def test_cfg_interval_is_open_below_closed_above():
    assert not cfg_active(0.4, (0.4, 1.0))
    assert cfg_active(0.4001, (0.4, 1.0))
    assert cfg_active(1.0, (0.4, 1.0))
    assert cfg_active(0.0001, (0.0, 1.0)) and not cfg_active(0.0, (0.0, 1.0))


def test_cfg_interval_bounds_compare_in_float32_as_the_reference():
    # 100 timesteps, shift 3: step 81 is float32(0.4). The reference tests `t > 0.4` on a float32
    # tensor, which is False there; in float64 it would be True (0.4000000059604645 > 0.4).
    t, _ = timestep_schedule(100, 3.0)
    on_bound = [i for i, x in enumerate(t) if x == torch.tensor(0.4)]
    assert on_bound == [81] and t[81].item() > 0.4
    assert [cfg_active(x.item(), (0.4, 1.0)) for x in t] == [bool(x > 0.4) and bool(x <= 1.0) for x in t]
    assert not cfg_active(t[81].item(), (0.4, 1.0)) and cfg_active(t[80].item(), (0.4, 1.0))
    # The LLM service gets the bounds as proto floats (float32): the same decision either way.
    assert cfg_active(t[81].item(), (0.4000000059604645, 1.0)) == cfg_active(t[81].item(), (0.4, 1.0))


def test_global_renorm_against_direct_computation():
    v, vt, vi = vecs(0)
    got = apply_cfg(v, vt, vi, 4.0, 2.0, "global", 0.0)
    guided = vt + 4.0 * (v - vt)
    guided = vi + 2.0 * (guided - vi)
    scale = min(max(v.norm().item() / (guided.norm().item() + 1e-8), 0.0), 1.0)
    torch.testing.assert_close(got, guided * scale)
    assert got.norm() <= v.norm() + 1e-4


def test_channel_renorm_is_per_token():
    v, vt, vi = vecs(1)
    got = apply_cfg(v, vt, vi, 3.0, 1.5, "channel", 0.0)
    guided = vi + 1.5 * (vt + 3.0 * (v - vt) - vi)
    for i in range(v.shape[0]):
        s = min(v[i].norm().item() / (guided[i].norm().item() + 1e-8), 1.0)
        torch.testing.assert_close(got[i], guided[i] * s)


def test_text_channel_renorms_before_image_guidance():
    v, vt, vi = vecs(2)
    got = apply_cfg(v, vt, vi, 4.0, 2.0, "text_channel", 0.0)
    text = vt + 4.0 * (v - vt)
    s = (v.norm(dim=1, keepdim=True) / (text.norm(dim=1, keepdim=True) + 1e-8)).clamp(0, 1)
    want = vi + 2.0 * (text * s - vi)
    torch.testing.assert_close(got, want)
    # and not the other order (image guidance first, renorm last):
    other = apply_cfg(v, vt, vi, 4.0, 2.0, "channel", 0.0)
    assert (got - other).abs().max() > 1e-3


def test_renorm_min_floors_the_scale():
    v, vt, vi = vecs(3)
    got = apply_cfg(v, vt, vi, 8.0, 1.0, "global", 0.9)
    guided = vt + 8.0 * (v - vt)
    ratio = v.norm() / (guided.norm() + 1e-8)
    assert ratio < 0.9  # the floor is what decides here
    torch.testing.assert_close(got, guided * 0.9)


def test_no_text_guidance_means_plain_velocity_and_image_branch_is_ignored():
    v, vt, vi = vecs(4)
    assert torch.equal(apply_cfg(v, vt, vi, 1.0, 3.0, "global", 0.0), v)
    # img_scale <= 1: the no-image velocity has no influence
    a = apply_cfg(v, vt, vi, 4.0, 1.0, "global", 0.0)
    b = apply_cfg(v, vt, vi * 5, 4.0, 1.0, "global", 0.0)
    torch.testing.assert_close(a, b)


def test_unknown_renorm_type_is_refused():
    v, vt, vi = vecs(5)
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        apply_cfg(v, vt, vi, 4.0, 1.0, "bogus", 0.0)


def test_sampling_never_picks_rows_past_the_vocabulary():
    logits = torch.zeros(100)
    logits[95:] = 50.0  # the padding rows are the most likely by far
    assert sample_token(logits, 90, False, 1.0, 1.0, None) < 90
    g = torch.Generator().manual_seed(0)
    assert all(sample_token(logits, 90, True, 1.0, 1.0, g) < 90 for _ in range(50))


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = {sample_token(logits, 4, True, 1.0, 0.7, g) for _ in range(200)}
    assert picks == {0, 1}
    picks = {sample_token(logits, 4, True, 1.0, 0.4, g) for _ in range(50)}
    assert picks == {0}


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0])
    g = torch.Generator().manual_seed(1)
    hot = sum(sample_token(logits, 2, True, 5.0, 1.0, g) for _ in range(400)) / 400
    cold = sum(sample_token(logits, 2, True, 0.1, 1.0, g) for _ in range(400)) / 400
    expected_hot = 1 / (1 + math.exp(0.2))
    assert abs(hot - expected_hot) < 0.08 and cold < 0.01
