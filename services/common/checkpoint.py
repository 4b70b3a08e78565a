"""Read a BAGEL checkpoint directory in the official layout.

    ema.safetensors      every Bagel weight except the VAE (bf16)
    ae.safetensors       the FLUX autoencoder (fp32)
    llm_config.json      Qwen2 config          vit_config.json   SigLIP vision config
    vocab.json merges.txt tokenizer.json tokenizer_config.json

Each component loads only its own key subset, strictly: a missing, unexpected or mis-shaped key is
an error that names the key. Sizes come from the checkpoint itself: the LLM and ViT from their json
files, the position-table side lengths from the tables' rows, the autoencoder's widths from the
shapes in ae.safetensors (the official layout has no AE config).

The models are built by their own packages (`load_llm` in services/llm/model.py, `load_vit` in
services/vit/model.py, `load_ae` in services/vae/model.py), which hand them to `load_weights`; the
random checkpoint writer is services/dev/random_checkpoint.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from services.common.contracts import InputError
from services.common.config import AEConfig, BagelConfig, LLMConfig, ViTConfig, side_of_square_table
from services.common.tokenizer import TOKENIZER_FILES, BagelTokenizer

EMA_FILE, AE_FILE, LLM_CONFIG, VIT_CONFIG = "ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json"
VIT_PREFIX = "vit_model.vision_model."
LATENT_POS_KEY, VIT_POS_KEY = "latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"
VIT_TABLE_KEY = VIT_PREFIX + "embeddings.position_embedding.weight"
COMPONENTS = ("llm", "vit", "ae")


class CheckpointError(InputError):
    """The checkpoint directory is not in the expected layout; the message names what is wrong."""


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def infer_ae_config(shapes: dict[str, tuple[int, ...]]) -> AEConfig:
    """Read the FLUX autoencoder's sizes off its tensor shapes."""
    try:
        ch, in_ch = shapes["encoder.conv_in.weight"][:2]
        levels = 0
        while f"encoder.down.{levels}.block.0.conv1.weight" in shapes:
            levels += 1
        ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
        blocks = 0
        while f"encoder.down.0.block.{blocks}.conv1.weight" in shapes:
            blocks += 1
        z = shapes["decoder.conv_in.weight"][1]
        out_ch = shapes["decoder.conv_out.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"{AE_FILE}: missing key {e.args[0]} needed to infer the autoencoder's sizes") from None
    if levels == 0 or blocks == 0:
        raise CheckpointError(f"{AE_FILE}: no encoder.down.*.block.* weights found")
    return AEConfig(in_channels=in_ch, out_channels=out_ch, ch=ch, ch_mult=ch_mult, num_res_blocks=blocks,
                    z_channels=z)


def check_state_dict(expected: dict[str, torch.Tensor] | dict[str, tuple], got: dict[str, tuple[int, ...]],
                     where: str) -> None:
    """Strict comparison of key sets and shapes; raises CheckpointError naming the offending keys."""
    exp = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in expected.items()}
    missing = sorted(set(exp) - set(got))
    unexpected = sorted(set(got) - set(exp))
    mis = sorted(k for k in set(exp) & set(got) if exp[k] != tuple(got[k]))
    problems = []
    if missing:
        problems.append(f"missing key(s): {_clip(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {_clip(unexpected)}")
    if mis:
        problems.append("mis-shaped key(s): " + _clip([f"{k} is {list(got[k])}, expected {list(exp[k])}" for k in mis]))
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def _clip(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


class Checkpoint:
    """A checkpoint directory. Construction reads only json files and tensor headers."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.dir}")
        missing = [n for n in (EMA_FILE, AE_FILE, LLM_CONFIG, VIT_CONFIG, *TOKENIZER_FILES) if not (self.dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{self.dir}: missing file(s) {missing}")
        self.ema_shapes = _shapes(self.dir / EMA_FILE)
        self.ae_shapes = _shapes(self.dir / AE_FILE)
        self.config = self._read_config()

    def _read_config(self) -> BagelConfig:
        try:
            llm = LLMConfig.from_json(json.loads((self.dir / LLM_CONFIG).read_text()))
            vit = ViTConfig.from_json(json.loads((self.dir / VIT_CONFIG).read_text()))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{self.dir}: bad config json: {e}") from None
        for key in (LATENT_POS_KEY, VIT_POS_KEY, VIT_TABLE_KEY):
            if key not in self.ema_shapes:
                raise CheckpointError(f"{EMA_FILE}: missing key {key}")
        max_latent = side_of_square_table(self.ema_shapes[LATENT_POS_KEY][0], LATENT_POS_KEY)
        vit_side = side_of_square_table(self.ema_shapes[VIT_TABLE_KEY][0], VIT_TABLE_KEY)
        return BagelConfig(llm=llm, vit=vit, ae=infer_ae_config(self.ae_shapes), max_latent_size=max_latent,
                           vit_max_num_patch_per_side=vit_side)

    def tokenizer(self) -> BagelTokenizer:
        return BagelTokenizer(self.dir)

    # ---- weights: each component reads its own subset only ---------------------------------------
    def load_weights(self, model: nn.Module, component: str, dtype=torch.float32, device="cpu") -> nn.Module:
        """Fill `model` (built from self.config, typically on the meta device) with the weights of
        `component` ("llm", "vit" or "ae"), strictly, and return it in eval mode without gradients."""
        if component == "llm":  # everything in ema.safetensors but the vision tower
            keys = {k: s for k, s in self.ema_shapes.items() if not k.startswith("vit_model.")}
            return _load(model, self.dir / EMA_FILE, keys, "", dtype, device, f"{EMA_FILE} (LLM subset)")
        if component == "vit":
            keys = {k: s for k, s in self.ema_shapes.items() if k.startswith("vit_model.")}
            return _load(model, self.dir / EMA_FILE, keys, VIT_PREFIX, dtype, device, f"{EMA_FILE} (ViT subset)")
        if component == "ae":
            return _load(model, self.dir / AE_FILE, self.ae_shapes, "", dtype, device, AE_FILE)
        raise ValueError(f"unknown component {component!r}; choose one of {list(COMPONENTS)}")


def _load(model: nn.Module, path: Path, file_shapes: dict[str, tuple], prefix: str, dtype, device, where: str):
    expected = {prefix + k: v for k, v in model.state_dict().items()}
    check_state_dict(expected, file_shapes, where)
    state = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in expected:
            state[key[len(prefix):]] = f.get_tensor(key).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


__all__ = ["Checkpoint", "CheckpointError", "COMPONENTS", "infer_ae_config", "check_state_dict"]
