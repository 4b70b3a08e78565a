"""gRPC glue for the VAE: bagel.v1.VAEService and KServe v2 models "flux_vae_encode" / "flux_vae_decode".

The servicers only translate messages to and from VAEEngine's types; limits, auth, metrics, errors
and the lifecycle live in services.common.rpc.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from services.common.checkpoint import Checkpoint
from services.common.config import BagelConfig
from services.common.images import ImageSettings, VAE_RESIZE, load_image, vae_resize
from services.common.kserve import add_kserve, KServeModel, KServeServicer, SERVICE_NAME as KSERVE_SERVICE, TensorSpec
from services.common.protos import common_pb2, service_name, vae_pb2, vae_pb2_grpc
from services.common.rpc import ModelServer, ServerOptions
from services.common.rpc.deadlines import check_active
from services.common.rpc.payloads import BOTH, INLINE, OBJECT, Payloads, check_count, check_output_keys
from services.common.storage import ObjectStore, digest, encode_png
from services.common.tensor_codec import expect, tensor_to_safetensors
from services.vae.engine import VAEEngine, check_image_size

NAME = "vae"
ENCODE_MODEL, DECODE_MODEL = "flux_vae_encode", "flux_vae_decode"
VAE_SERVICE = service_name(vae_pb2, "VAEService")
MAX_SIDE = VAE_RESIZE[0]  # 1024 px: the largest image the VAE resize and the generator produce
LATENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def prepare_image(image: Image.Image, resize: int) -> Image.Image:
    """The official resize, or the image as given when the VAE can take its size."""
    if resize == vae_pb2.RESIZE_OFFICIAL:
        return vae_resize(image)
    if resize != vae_pb2.RESIZE_NONE:
        raise ValueError(f"unknown resize mode {resize}")
    check_image_size(*image.size, max_side=MAX_SIDE)
    return image


def check_latent(latent: torch.Tensor, z_channels: int, where: str) -> torch.Tensor:
    expect(latent, (z_channels, None, None), LATENT_DTYPES, where, finite=True)
    h, w = latent.shape[1:]
    if not (0 < h <= MAX_SIDE // 8 and 0 < w <= MAX_SIDE // 8):
        raise ValueError(f"{where}: latent sides must be in [1, {MAX_SIDE // 8}], got {h}x{w}")
    return latent.float()


def _generator(inp) -> torch.Generator | None:
    return torch.Generator().manual_seed(inp.seed) if inp.sample and inp.HasField("seed") else None


class VAEServicer(vae_pb2_grpc.VAEServiceServicer):
    def __init__(self, server: ModelServer, cfg: BagelConfig, payloads: Payloads):
        self.slot, self.metrics, self.payloads = server.slot, server.metrics, payloads
        self.max_items = server.options.max_images_per_request
        self.z_channels = cfg.ae.z_channels

    def Encode(self, request, context):
        check_count(request.inputs, self.max_items, "inputs")
        check_output_keys(request.inputs, request.job_id)
        delivery = self.payloads.delivery(request.delivery)
        response = vae_pb2.VAEEncodeResponse()
        for i, inp in enumerate(request.inputs):  # one forward each: sizes differ
            src = self.payloads.image(inp.image, f"inputs[{i}].image")
            image = prepare_image(src.image, inp.resize)
            check_active(context)
            with self.slot.use(context) as engine:
                latent = engine.encode(image, sample=inp.sample, generator=_generator(inp)).latent  # [z, H/8, W/8]
            seed = str(inp.seed) if inp.HasField("seed") else ""
            key = self.payloads.key(inp.output_key, "latents",
                                    digest("vae-encode", str(inp.resize), str(inp.sample), seed, src.data),
                                    "safetensors", request.job_id)
            ref, inline = self.payloads.put_tensor(latent, delivery, key, request.inline_encoding)
            response.latents.append(common_pb2.Latent(ref=ref, inline=inline, size=common_pb2.ImageSize(
                width=image.width, height=image.height)))
        self.metrics.batch_size.labels("VAEService.Encode").observe(len(request.inputs))
        return response

    def Decode(self, request, context):
        check_count(request.inputs, self.max_items, "inputs")
        check_output_keys(request.inputs, request.job_id)
        delivery = self.payloads.delivery(request.delivery)
        latents = [check_latent(self.payloads.latent(inp.latent, f"inputs[{i}].latent"), self.z_channels,
                                f"inputs[{i}].latent") for i, inp in enumerate(request.inputs)]
        response = vae_pb2.VAEDecodeResponse()
        for inp, latent in zip(request.inputs, latents):
            check_active(context)
            with self.slot.use(context) as engine:
                pixels = engine.decode(latent)  # uint8 [H, W, 3]
            png = encode_png(pixels)
            out = response.images.add(size=common_pb2.ImageSize(width=pixels.shape[1], height=pixels.shape[0]))
            if delivery in (OBJECT, BOTH):
                key = self.payloads.key(inp.output_key, "images", digest("vae-decode", tensor_to_safetensors(latent)),
                                        "png", request.job_id)
                out.object.CopyFrom(self.payloads.put_png(png, key))
            if delivery in (INLINE, BOTH):
                out.png = png
        self.metrics.batch_size.labels("VAEService.Decode").observe(len(request.inputs))
        return response


def kserve_models(server: ModelServer, cfg: BagelConfig) -> list[KServeModel]:
    """flux_vae_encode: IMAGE (BYTES [1]) -> LATENT (FP32 [z, H/8, W/8]); parameter resize="none" skips
    the official resize. flux_vae_decode: LATENT (FP32 [z, h, w]) -> IMAGE (UINT8 [8h, 8w, 3])."""
    slot, metrics, z = server.slot, server.metrics, cfg.ae.z_channels
    exif_transpose = ImageSettings.from_env().exif_transpose

    def encode(inputs, parameters, context):
        resize = {"official": vae_pb2.RESIZE_OFFICIAL, "none": vae_pb2.RESIZE_NONE}.get(
            str(parameters.get("resize", "official")))
        if resize is None:
            raise ValueError(f"parameter resize must be 'official' or 'none', got {parameters.get('resize')!r}")
        image = prepare_image(load_image(inputs["IMAGE"].reshape(-1)[0], exif_transpose=exif_transpose), resize)
        check_active(context)
        with slot.use(context) as engine:
            latent = engine.encode(image).latent
        metrics.batch_size.labels(ENCODE_MODEL).observe(1)
        return {"LATENT": latent.float().numpy()}

    def decode(inputs, parameters, context):
        latent = check_latent(torch.from_numpy(inputs["LATENT"]), z, "input 'LATENT'")
        check_active(context)
        with slot.use(context) as engine:
            pixels = engine.decode(latent)
        metrics.batch_size.labels(DECODE_MODEL).observe(1)
        return {"IMAGE": np.ascontiguousarray(pixels)}

    return [
        KServeModel(ENCODE_MODEL, inputs=[TensorSpec("IMAGE", "BYTES", [1])],
                    outputs=[TensorSpec("LATENT", "FP32", [z, -1, -1])], infer=encode),
        KServeModel(DECODE_MODEL, inputs=[TensorSpec("LATENT", "FP32", [z, -1, -1])],
                    outputs=[TensorSpec("IMAGE", "UINT8", [-1, -1, 3])], infer=decode),
    ]


def build_server(options: ServerOptions, cfg: BagelConfig, store: ObjectStore | None = None) -> ModelServer:
    """The server, not started; `cfg` (read from the checkpoint's json, no weights) sizes the metadata."""
    server = ModelServer(NAME, options)
    servicer = VAEServicer(server, cfg, Payloads(store))
    kserve = KServeServicer("bagel-vae", kserve_models(server, cfg), is_ready=lambda: server.ready)
    server.add_service(VAE_SERVICE, lambda s: vae_pb2_grpc.add_VAEServiceServicer_to_server(servicer, s))
    server.add_service(KSERVE_SERVICE, lambda s: add_kserve(s, kserve))
    return server


def load_engine(ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype = torch.float32) -> VAEEngine:
    return VAEEngine.from_checkpoint(ckpt, device=device, dtype=dtype)
