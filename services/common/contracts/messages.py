"""Parameters and items <-> bagel.v1 messages, for every side: the LLM server reads requests with these,
the gateway plans jobs with them, the gRPC clients write requests with them. Tensors are only touched
when an item or the noise carries one inline (the tensor codec is then imported, and torch with it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.common.contracts.errors import InputError
from services.common.contracts.requests import (ContextItem, ImageParams, TextItem, TextParams, VAEImageItem,
                                                ViTImageItem)
from services.common.protos import common_pb2, llm_pb2

if TYPE_CHECKING:
    from services.common.config import BagelConfig

RAW = 0  # bagel.v1.TensorEncoding
RENORM_NAMES = {llm_pb2.CFG_RENORM_TYPE_GLOBAL: "global", llm_pb2.CFG_RENORM_TYPE_CHANNEL: "channel",
                llm_pb2.CFG_RENORM_TYPE_TEXT_CHANNEL: "text_channel"}
RENORM_ENUMS = {name: value for value, name in RENORM_NAMES.items()}


# ---- messages -> parameters ----------------------------------------------------------------------------
def text_params(msg: llm_pb2.TextParams, default_tokens: int) -> TextParams:
    """Unset fields take the proto's defaults; out-of-range values raise InputError."""
    p = TextParams(max_new_tokens=default_tokens)
    for name in ("max_new_tokens", "do_sample", "temperature", "top_p", "seed"):
        if msg.HasField(name):
            setattr(p, name, getattr(msg, name))
    p.validate()
    return p


def image_params(msg: llm_pb2.ImageParams, cfg: BagelConfig, input_size: tuple[int, int] | None = None,
                 has_input_image: bool = False) -> ImageParams:
    """The preset's defaults (UNSPECIFIED: EDIT when the request edits an image) with the set fields over
    them. EDIT's default size is `input_size` (width, height), the first input latent's image size
    (1024x1024 when there is none). The noise field is the caller's to read (it is a tensor)."""
    preset = msg.preset
    if preset == llm_pb2.IMAGE_PRESET_UNSPECIFIED:
        preset = llm_pb2.IMAGE_PRESET_EDIT if has_input_image else llm_pb2.IMAGE_PRESET_GENERATE
    if preset == llm_pb2.IMAGE_PRESET_EDIT:
        w, h = input_size or (1024, 1024)
        p = ImageParams.for_edit(w, h)
    elif preset == llm_pb2.IMAGE_PRESET_GENERATE:
        p = ImageParams()
    else:
        raise InputError(f"params.preset: unknown value {preset}")
    for name in ("width", "height", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_min", "timestep_shift",
                 "num_timesteps", "seed"):
        if msg.HasField(name):
            setattr(p, name, getattr(msg, name))
    lo = msg.cfg_interval_lo if msg.HasField("cfg_interval_lo") else p.cfg_interval[0]
    hi = msg.cfg_interval_hi if msg.HasField("cfg_interval_hi") else p.cfg_interval[1]
    p.cfg_interval = (lo, hi)
    if msg.cfg_renorm_type != llm_pb2.CFG_RENORM_TYPE_UNSPECIFIED:
        if msg.cfg_renorm_type not in RENORM_NAMES:
            raise InputError(f"params.cfg_renorm_type: unknown value {msg.cfg_renorm_type}")
        p.cfg_renorm_type = RENORM_NAMES[msg.cfg_renorm_type]
    p.validate(cfg)
    return p


# ---- parameters -> messages (clients) --------------------------------------------------------------------
def text_params_message(p: TextParams | None) -> llm_pb2.TextParams | None:
    if p is None:
        return None
    msg = llm_pb2.TextParams(max_new_tokens=p.max_new_tokens, do_sample=p.do_sample, temperature=p.temperature,
                             top_p=p.top_p)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def image_params_message(p: ImageParams, encoding: int = RAW) -> llm_pb2.ImageParams:
    """Every field set explicitly, so the server's preset defaults never apply: the run is the one asked for."""
    msg = llm_pb2.ImageParams(
        preset=llm_pb2.IMAGE_PRESET_GENERATE, width=p.width, height=p.height, cfg_text_scale=p.cfg_text_scale,
        cfg_img_scale=p.cfg_img_scale, cfg_interval_lo=p.cfg_interval[0], cfg_interval_hi=p.cfg_interval[1],
        cfg_renorm_min=p.cfg_renorm_min, cfg_renorm_type=RENORM_ENUMS.get(p.cfg_renorm_type, 0),
        timestep_shift=p.timestep_shift, num_timesteps=p.num_timesteps)
    if p.seed is not None:
        msg.seed = p.seed
    if p.noise is not None:
        from services.common.tensor_codec import tensor_to_message

        msg.noise.inline.CopyFrom(tensor_to_message(p.noise.float(), encoding))
    return msg


def item_message(item: ContextItem, *, down: int, encoding: int = RAW) -> llm_pb2.ContextItem:
    """An item with its tensor inline (clients holding a stored object's key pass that instead); down is the
    VAE's downsample (cfg.ae.downsample), which sizes a latent's image."""
    if isinstance(item, TextItem):
        return llm_pb2.ContextItem(text=item.text)
    from services.common.tensor_codec import tensor_to_message

    if isinstance(item, ViTImageItem):
        h, w = item.grid
        vit = common_pb2.ViTFeatures(inline=tensor_to_message(item.features, encoding),
                                     grid=common_pb2.PatchGrid(rows=h, cols=w))
        return llm_pb2.ContextItem(image=llm_pb2.ImageItem(vit=vit))
    if isinstance(item, VAEImageItem):
        latent = latent_message(item.latent, down=down, encoding=encoding)
        return llm_pb2.ContextItem(image=llm_pb2.ImageItem(vae=latent))
    raise TypeError(f"unknown context item {type(item).__name__}")


def latent_message(latent, *, down: int, encoding: int = RAW) -> common_pb2.Latent:
    from services.common.tensor_codec import tensor_to_message

    return common_pb2.Latent(inline=tensor_to_message(latent, encoding), size=latent_size(latent.shape, down))


def latent_size(shape, down: int) -> common_pb2.ImageSize:
    """The image size of a latent of shape [z, h, w]. down (cfg.ae.downsample) has no default: it is the
    checkpoint's, not a constant."""
    return common_pb2.ImageSize(width=shape[2] * down, height=shape[1] * down)
