"""gRPC glue for the ViT: bagel.v1.ViTService and KServe v2 model "siglip_vit" on one port.

The servicers only translate messages to and from ViTEngine's types; limits, auth, metrics, errors
and the lifecycle live in services.common.rpc.
"""

from __future__ import annotations

import numpy as np
import torch

from services.common.checkpoint import Checkpoint
from services.common.config import BagelConfig
from services.common.images import ImageSettings, VIT_RESIZE, load_image, resize_size
from services.common.kserve import add_kserve, KServeModel, KServeServicer, SERVICE_NAME as KSERVE_SERVICE, TensorSpec
from services.common.protos import common_pb2, service_name, vit_pb2, vit_pb2_grpc
from services.common.rpc import ModelServer, ServerOptions
from services.common.rpc.deadlines import check_active
from services.common.contracts import TooLarge
from services.common.rpc.payloads import InputImage, Payloads, check_count, check_output_keys
from services.common.storage import ObjectStore, digest
from services.vit.engine import ViTEngine

NAME = "vit"
KSERVE_MODEL = "siglip_vit"
VIT_SERVICE = service_name(vit_pb2, "ViTService")
# Patches packed into one forward: 8 full-size (980 px, 70x70 patch) images of the published model.
MAX_PACKED_PATCHES = 8 * 70 * 70
# Decoded pixels a request may hold before its forward (~384 MiB of RGB); one image alone may have 64 Mpx.
MAX_REQUEST_PIXELS = 128 * 1024 * 1024
_OUTPUT_DTYPES = {common_pb2.DTYPE_UNSPECIFIED: torch.float32, common_pb2.DTYPE_FLOAT32: torch.float32,
                  common_pb2.DTYPE_BFLOAT16: torch.bfloat16}


def patch_count(width: int, height: int, patch: int) -> int:
    """Patches of an image after the ViT resize, known before any pixel is touched."""
    w, h = resize_size(width, height, *VIT_RESIZE)
    return (w // patch) * (h // patch)


class ViTServicer(vit_pb2_grpc.ViTServiceServicer):
    def __init__(self, server: ModelServer, cfg: BagelConfig, payloads: Payloads):
        self.slot, self.metrics, self.payloads = server.slot, server.metrics, payloads
        self.max_images = server.options.max_images_per_request
        self.patch = cfg.vit.patch_size

    def Encode(self, request, context):
        check_count(request.inputs, self.max_images, "inputs")
        check_output_keys(request.inputs, request.job_id)
        if request.output_dtype not in _OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be DTYPE_FLOAT32 or DTYPE_BFLOAT16, got "
                             f"{common_pb2.DType.Name(request.output_dtype)}")
        delivery = self.payloads.delivery(request.delivery)
        images = self._load_images(request.inputs)
        check_active(context)
        with self.slot.use(context) as engine:
            items = engine.encode([im.image for im in images])  # one packed forward
        self.metrics.batch_size.labels("ViTService.Encode").observe(len(items))
        check_active(context)
        return vit_pb2.ViTEncodeResponse(features=[
            self._features(item, im, inp.output_key, _OUTPUT_DTYPES[request.output_dtype], delivery, request)
            for inp, im, item in zip(request.inputs, images, items)])

    def _load_images(self, inputs) -> list[InputImage]:
        images, pixels = [], 0
        for i, inp in enumerate(inputs):
            if pixels > MAX_REQUEST_PIXELS:  # decoded images are held until the forward: bound their sum
                raise TooLarge(f"the images hold over {MAX_REQUEST_PIXELS} pixels in all; send fewer per request")
            images.append(self.payloads.image(inp.image, f"inputs[{i}].image"))
            pixels += images[-1].image.width * images[-1].image.height
        patches = sum(patch_count(*im.image.size, self.patch) for im in images)
        if patches > MAX_PACKED_PATCHES:
            raise TooLarge(f"the images need {patches} patches in one forward; the limit is {MAX_PACKED_PATCHES}: "
                           "send fewer images per request")
        return images

    def _features(self, item, image: InputImage, output_key: str, dtype: torch.dtype, delivery: int,
                  request) -> common_pb2.ViTFeatures:
        feats = item.features.to(dtype)  # [h*w, vit_hidden]
        key = self.payloads.key(output_key, "features", digest("vit-encode", str(dtype), image.data), "safetensors",
                                request.job_id)
        ref, inline = self.payloads.put_tensor(feats, delivery, key, request.inline_encoding)
        h, w = item.grid
        return common_pb2.ViTFeatures(ref=ref, inline=inline, grid=common_pb2.PatchGrid(rows=h, cols=w),
                                      resized=common_pb2.ImageSize(width=w * self.patch, height=h * self.patch))


def kserve_model(server: ModelServer, cfg: BagelConfig) -> KServeModel:
    """"siglip_vit": IMAGE (BYTES [1], an encoded image) -> FEATURES (FP32 [N, hidden]), GRID (INT32 [2])."""
    slot, metrics = server.slot, server.metrics
    exif_transpose = ImageSettings.from_env().exif_transpose

    def infer(inputs, parameters, context):
        image = load_image(inputs["IMAGE"].reshape(-1)[0], exif_transpose=exif_transpose)
        check_active(context)
        with slot.use(context) as engine:
            (item,) = engine.encode([image])
        metrics.batch_size.labels("siglip_vit").observe(1)
        return {"FEATURES": item.features.float().numpy(), "GRID": np.asarray(item.grid, dtype=np.int32)}

    return KServeModel(KSERVE_MODEL, inputs=[TensorSpec("IMAGE", "BYTES", [1])],
                       outputs=[TensorSpec("FEATURES", "FP32", [-1, cfg.vit.hidden_size]),
                                TensorSpec("GRID", "INT32", [2])],
                       infer=infer)


def build_server(options: ServerOptions, cfg: BagelConfig, store: ObjectStore | None = None) -> ModelServer:
    """The server, not started; `cfg` (read from the checkpoint's json, no weights) sizes the metadata."""
    server = ModelServer(NAME, options)
    servicer = ViTServicer(server, cfg, Payloads(store))
    kserve = KServeServicer("bagel-vit", [kserve_model(server, cfg)], is_ready=lambda: server.ready)
    server.add_service(VIT_SERVICE, lambda s: vit_pb2_grpc.add_ViTServiceServicer_to_server(servicer, s))
    server.add_service(KSERVE_SERVICE, lambda s: add_kserve(s, kserve))
    return server


def load_engine(ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ViTEngine:
    return ViTEngine.from_checkpoint(ckpt, device=device, dtype=dtype)
