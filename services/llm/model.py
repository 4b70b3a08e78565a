"""Qwen2 Mixture-of-Transformers LLM plus the BAGEL glue modules (math only).

Module names reproduce the key names of the published `ema.safetensors` (minus `vit_model.*`):
`language_model.model.layers.{i}.self_attn.q_proj_moe_gen`, `connector.fc1`, `latent_pos_embed.pos_embed`...

MoT routing: every token is either "und" (text, image markers, ViT tokens) or "gen" (VAE latent
tokens, clean or noisy). Norms, q/k/v/o projections, q/k norms and MLPs exist twice and are chosen
per token; the self-attention itself runs once over all tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from services.common.checkpoint import Checkpoint
from services.common.config import BagelConfig, LLMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 whatever the activation dtype, as Qwen2RMSNorm does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Route:
    """Which packed tokens take the und weights and which the gen (`_moe_gen`) weights."""

    kind: str  # "und" (all tokens und), "gen" (all gen) or "mixed"
    und: torch.Tensor | None = None  # token indices, only when mixed
    gen: torch.Tensor | None = None

    @classmethod
    def from_mask(cls, is_gen: torch.Tensor | None) -> "Route":
        if is_gen is None or not bool(is_gen.any()):
            return cls("und")
        if bool(is_gen.all()):
            return cls("gen")
        return cls("mixed", und=(~is_gen).nonzero().squeeze(1), gen=is_gen.nonzero().squeeze(1))

    def apply(self, x: torch.Tensor, f_und: Callable, f_gen: Callable) -> torch.Tensor:
        if self.kind == "und":
            return f_und(x)
        if self.kind == "gen":
            return f_gen(x)
        # index_select / index_copy_: several times faster than advanced indexing on the CPU
        y_und = f_und(x.index_select(0, self.und))
        out = y_und.new_empty((x.shape[0], *y_und.shape[1:]))
        out.index_copy_(0, self.und, y_und)
        out.index_copy_(0, self.gen, f_gen(x.index_select(0, self.gen)))
        return out


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None]  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(h, self.num_heads * d, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(h, self.num_kv_heads * d, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(h, self.num_kv_heads * d, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(self.num_heads * d, h, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))

    def forward(self, x, route: Route, cos, sin, attend: Callable) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        q = route.apply(x, lambda a: self.q_norm(self.q_proj(a).view(-1, self.num_heads, d)),
                        lambda a: self.q_norm_moe_gen(self.q_proj_moe_gen(a).view(-1, self.num_heads, d)))
        k = route.apply(x, lambda a: self.k_norm(self.k_proj(a).view(-1, self.num_kv_heads, d)),
                        lambda a: self.k_norm_moe_gen(self.k_proj_moe_gen(a).view(-1, self.num_kv_heads, d)))
        v = route.apply(x, lambda a: self.v_proj(a).view(-1, self.num_kv_heads, d),
                        lambda a: self.v_proj_moe_gen(a).view(-1, self.num_kv_heads, d))
        # q: [T, Hq, D]; k, v: [T, Hkv, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attend(q, k, v).reshape(t, self.num_heads * d)  # [T, Hq*D]
        return route.apply(o, self.o_proj, self.o_proj_moe_gen)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            setattr(self, name + "_moe_gen", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def forward(self, x, route: Route, cos, sin, attend: Callable) -> torch.Tensor:
        h = route.apply(x, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(h, route, cos, sin, attend)
        h = route.apply(x, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        return x + route.apply(h, self.mlp, self.mlp_moe_gen)


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, embeds: torch.Tensor, is_gen: torch.Tensor | None, positions: torch.Tensor,
                attend_layer: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """embeds: [T, hidden] packed over sequences; returns final-normed hidden states [T, hidden].

        `attend_layer(layer_index, q, k, v)` does the attention (and any KV-cache write) for one layer.
        """
        route = Route.from_mask(is_gen)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, route, cos, sin, lambda q, k, v, i=i: attend_layer(i, q, k, v))
        return route.apply(x, self.model.norm, self.model.norm_moe_gen)


class MLPConnector(nn.Module):
    """ViT features -> LLM width: fc1, gelu(tanh), fc2."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PositionEmbedding(nn.Module):
    """A fixed 2D sin-cos table, stored in the checkpoint (already rounded to bf16: load, don't recompute)."""

    def __init__(self, max_per_side: int, hidden: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(max_per_side * max_per_side, hidden), requires_grad=False)

    def forward(self, position_ids):
        return self.pos_embed[position_ids]


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[N] raw t in [0, 1] -> [N, dim] = [cos(t*f), sin(t*f)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class BagelLLM(nn.Module):
    """Everything in ema.safetensors except the ViT: the LLM and the modules that feed it or read from it."""

    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(cfg.llm)
        self.connector = MLPConnector(cfg.vit.hidden_size, hidden)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, hidden)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, hidden)
        self.time_embedder = TimestepEmbedder(hidden, cfg.timestep_embed_dim)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, cfg.patch_latent_dim)

    # ---- token embeddings for each kind of block ------------------------------------------------
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(self, features: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """features: [N, vit_hidden] after the ViT's post_layernorm -> [N, hidden]."""
        return self.connector(features.to(self.vae2llm.weight.dtype)) + self.vit_pos_embed(position_ids)

    def embed_latent(self, tokens: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """tokens: [N, 64] patchified latent; t: [N] timesteps (0 for clean conditioning images)."""
        dtype = self.vae2llm.weight.dtype
        return self.vae2llm(tokens.to(dtype)) + self.time_embedder(t) + self.latent_pos_embed(position_ids)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states of latent tokens -> predicted velocity [N, 64]."""
        return self.llm2vae(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)


def load_llm(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device="cpu") -> BagelLLM:
    """The LLM of a checkpoint, built on the meta device and given its weights (one copy in memory)."""
    with torch.device("meta"):
        model = BagelLLM(ckpt.config)
    return ckpt.load_weights(model, "llm", dtype, device)
