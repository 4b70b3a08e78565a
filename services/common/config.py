"""Model configuration: one dataclass per component, presets as data.

Field names follow the published json files (`llm_config.json` is a Qwen2 config,
`vit_config.json` a SigLIP vision config) so that `from_json` / `to_json` round-trip them.
The autoencoder has no config file in the official layout: its sizes are read off the
tensor shapes in `ae.safetensors` (see `services.common.checkpoint.infer_ae_config`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LLMConfig:
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_json(self) -> dict[str, Any]:
        # The Qwen2 fields the published llm_config.json carries, so other tools can read ours.
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_act": self.hidden_act,
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "model_type": "qwen2",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": 131072,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LLMConfig":
        return _from_json(cls, data)


@dataclass(frozen=True)
class ViTConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    # As written in vit_config.json. Inference drops the last layer (see `num_layers_used`).
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def num_layers_used(self) -> int:
        # BAGEL selects the penultimate layer's output: the checkpoint holds layers 0..N-2.
        return self.num_hidden_layers - 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    def to_json(self) -> dict[str, Any]:
        return {
            "architectures": ["SiglipVisionModel"],
            "attention_dropout": 0.0,
            "hidden_act": self.hidden_act,
            "hidden_size": self.hidden_size,
            "image_size": self.image_size,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "model_type": "siglip_vision_model",
            "num_attention_heads": self.num_attention_heads,
            "num_channels": self.num_channels,
            "num_hidden_layers": self.num_hidden_layers,
            "patch_size": self.patch_size,
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ViTConfig":
        return _from_json(cls, data)


@dataclass(frozen=True)
class AEConfig:
    """FLUX autoencoder sizes. Widths, multipliers, block counts and z_channels come from tensor shapes."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class BagelConfig:
    """Everything a component needs; the three sub-configs plus the BAGEL glue sizes."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64  # latent_pos_embed has max_latent_size**2 rows
    vit_max_num_patch_per_side: int = 70  # vit_pos_embed / ViT position table rows = this**2
    timestep_embed_dim: int = 256

    @property
    def latent_channels(self) -> int:
        return self.ae.z_channels

    @property
    def patch_latent_dim(self) -> int:
        # One latent token = a 2x2 patch of the 16-channel latent: 64 values in (p, q, c) order.
        return self.latent_patch_size**2 * self.ae.z_channels

    @property
    def latent_downsample(self) -> int:
        # Pixels per latent token side: the AE's 8 times the 2x2 latent patch = 16.
        return self.ae.downsample * self.latent_patch_size

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample


def _from_json(cls, data: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [n for n in names if n not in data and n not in _OPTIONAL_JSON_FIELDS]
    if missing:
        raise ValueError(f"{cls.__name__}: config json lacks required field(s) {sorted(missing)}")
    return cls(**{k: v for k, v in data.items() if k in names})


_OPTIONAL_JSON_FIELDS = {"hidden_act", "max_position_embeddings", "num_channels", "image_size", "layer_norm_eps"}


PRESETS: dict[str, BagelConfig] = {
    # The published BAGEL-7B-MoT sizes.
    "bagel-7b-mot": BagelConfig(),
    # Keeps every test at seconds per workflow on a CPU. The vocabulary stays full size so the real
    # Qwen2 tokenizer and special-token ids work unchanged; GQA (2:1) and the 2x2 latent patch are kept.
    "tiny": BagelConfig(
        llm=LLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2),
        vit=ViTConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4),
        ae=AEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    ),
    # For benchmarks: big enough that compute, not Python overhead, dominates on a CPU. GQA 4:1.
    "small": BagelConfig(
        llm=LLMConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2),
        vit=ViTConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=5, num_attention_heads=4),
        ae=AEConfig(ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    ),
}


def preset(name: str) -> BagelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def side_of_square_table(rows: int, what: str) -> int:
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"{what} has {rows} rows, not a square grid")
    return side
