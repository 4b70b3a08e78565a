"""Flow-matching sampler math: the timestep schedule, classifier-free guidance and its renorms, and
text-token sampling. Pure functions on tensors, each tested against a direct computation."""

from __future__ import annotations

import torch

from services.common.contracts import RENORM_TYPES  # one list, shared with the params rules


def timestep_schedule(num_timesteps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, dt) for the num_timesteps-1 Euler steps: t = linspace(1, 0, N), shifted s*t / (1 + (s-1)*t)."""
    t = torch.linspace(1, 0, num_timesteps)
    t = shift * t / (1 + (shift - 1) * t)
    return t[:-1], t[:-1] - t[1:]


def cfg_active(t: float, interval: tuple[float, float]) -> bool:
    """CFG applies only when interval_lo < t <= interval_hi (t is the shifted timestep).

    Compared in float32, as the reference compares its float32 timestep tensor with the Python floats
    of the interval (`t > 0.4` rounds 0.4 to float32). In float64 a timestep that lands on a bound
    would differ: with 100 timesteps and shift 3, step 81 is float32(0.4), where the reference (and
    the LLM service, which receives the bounds as proto floats) has guidance off."""
    t32, lo, hi = (torch.tensor(v, dtype=torch.float32) for v in (t, *interval))
    return bool(lo < t32) and bool(t32 <= hi)


def apply_cfg(v: torch.Tensor, v_notext: torch.Tensor | None, v_noimg: torch.Tensor | None,
              text_scale: float, img_scale: float, renorm_type: str, renorm_min: float) -> torch.Tensor:
    """Combine the branch velocities [N, 64] of one image as the reference does.

    Without text guidance (text_scale <= 1) the result is the conditional velocity: the image branch
    has no effect then, exactly as in the reference.
    """
    if text_scale <= 1.0:
        return v
    v_text = v_notext + text_scale * (v - v_notext)
    use_img = img_scale > 1.0
    if renorm_type == "text_channel":
        v_text = v_text * _renorm_scale(v, v_text, renorm_min, per_token=True)
        return v_noimg + img_scale * (v_text - v_noimg) if use_img else v_text
    guided = v_noimg + img_scale * (v_text - v_noimg) if use_img else v_text
    if renorm_type not in ("global", "channel"):
        raise ValueError(f"unknown cfg_renorm_type {renorm_type!r}; choose one of {RENORM_TYPES}")
    return guided * _renorm_scale(v, guided, renorm_min, per_token=renorm_type == "channel")


def _renorm_scale(v: torch.Tensor, guided: torch.Tensor, renorm_min: float, per_token: bool) -> torch.Tensor:
    # Shrink the guided velocity so its norm never exceeds the conditional one's (clamped to [min, 1]).
    if per_token:
        ratio = v.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + 1e-8)
    else:
        ratio = v.norm() / (guided.norm() + 1e-8)
    return ratio.clamp(min=renorm_min, max=1.0)


def sample_token(logits: torch.Tensor, valid_vocab: int, do_sample: bool, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> int:
    """One token id from logits [V]. Rows past the tokenizer's vocabulary are never chosen."""
    logits = logits.float().clone()
    logits[valid_vocab:] = float("-inf")
    if not do_sample:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(0) - sorted_p >= top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
