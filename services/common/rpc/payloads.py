"""Message payloads <-> engine types: input images and tensors (inline or from storage) in, output
tensors and PNGs (inline and/or stored under idempotent keys) out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from services.common.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, ImageError, ImageSettings, load_image
from services.common.protos import common_pb2
from services.common.contracts import TooLarge
from services.common.rpc.logs import current_request_id
from services.common.storage import (ObjectStore, StorageNotConfigured, check_input_key, check_output_key,
                                     output_key)
from services.common.tensor_codec import check_declared, enum_from_dtype, tensor_from_message, tensor_to_message

INLINE, OBJECT, BOTH = common_pb2.DELIVERY_INLINE, common_pb2.DELIVERY_OBJECT, common_pb2.DELIVERY_BOTH


@dataclass
class InputImage:
    image: Image.Image  # RGB
    data: bytes         # the encoded bytes, for content-addressed output keys


class Payloads:
    def __init__(self, store: ObjectStore | None, max_image_bytes: int = MAX_IMAGE_BYTES,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, exif_transpose: bool | None = None):
        self.store = store
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        self.exif_transpose = ImageSettings.from_env().exif_transpose if exif_transpose is None else exif_transpose

    def _store(self) -> ObjectStore:
        if self.store is None:
            raise StorageNotConfigured("this server has no object storage configured (BAGEL_S3_ENDPOINT): send "
                                       "and request data inline")
        return self.store

    # ---- inputs ------------------------------------------------------------------------------------
    def image(self, ref: common_pb2.ImageRef, where: str) -> InputImage:
        which = ref.WhichOneof("source")
        if which == "encoded":
            data = ref.encoded
        elif which == "object":
            data = self._store().get_bytes(check_input_key(ref.object.key), ref.object.bucket,
                                           max_bytes=self.max_image_bytes)
        else:
            raise ImageError(f"{where}: no image given (set `encoded` or `object`)")
        try:
            return InputImage(load_image(data, self.max_image_bytes, self.max_image_pixels, self.exif_transpose), data)
        except ImageError as e:
            raise ImageError(f"{where}: {e}") from None

    def tensor(self, ref: common_pb2.TensorRef | None, inline: common_pb2.Tensor | None, where: str) -> torch.Tensor:
        """The inline copy when present (no storage round trip), else the referenced object."""
        if inline is not None:
            return tensor_from_message(inline, where)
        if ref is not None and ref.key:
            tensor = self._store().get_tensor(check_input_key(ref.key), ref.bucket)
            check_declared(tensor, ref.shape, ref.dtype, f"{where} ({ref.key})", shape_given=len(ref.shape) > 0)
            return tensor
        raise ValueError(f"{where}: no tensor given (set `inline` or `ref`)")

    def source(self, msg: common_pb2.TensorSource, where: str) -> torch.Tensor:
        which = msg.WhichOneof("source")
        return self.tensor(msg.ref if which == "ref" else None, msg.inline if which == "inline" else None, where)

    def vit_features(self, msg: common_pb2.ViTFeatures, where: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """Features [rows*cols, hidden] and their (rows, cols) grid; the grid must match the row count."""
        feats = self.tensor(msg.ref if msg.HasField("ref") else None,
                            msg.inline if msg.HasField("inline") else None, where)
        grid = (msg.grid.rows, msg.grid.cols)
        if feats.dim() != 2 or feats.shape[0] != grid[0] * grid[1] or 0 in grid:
            raise ValueError(f"{where}: features {list(feats.shape)} do not fit a {grid[0]}x{grid[1]} patch grid")
        return feats, grid

    def latent(self, msg: common_pb2.Latent, where: str) -> torch.Tensor:
        return self.tensor(msg.ref if msg.HasField("ref") else None,
                           msg.inline if msg.HasField("inline") else None, where)

    # ---- outputs -----------------------------------------------------------------------------------
    def delivery(self, requested: int) -> int:
        """DELIVERY_UNSPECIFIED -> object storage when configured, else inline."""
        if requested == common_pb2.DELIVERY_UNSPECIFIED:
            return OBJECT if self.store is not None else INLINE
        if requested in (OBJECT, BOTH):
            self._store()
        return requested

    def key(self, explicit: str, kind: str, name: str, ext: str, job_id: str) -> str:
        if explicit:
            return check_output_key(explicit, job_id)  # never another job's objects
        return output_key(kind, name, ext, job_id=job_id, request_id=current_request_id() or "")

    def put_tensor(self, tensor: torch.Tensor, delivery: int, key: str,
                   encoding: int) -> tuple[common_pb2.TensorRef | None, common_pb2.Tensor | None]:
        ref = inline = None
        if delivery in (OBJECT, BOTH):
            self._store().put_tensor(key, tensor)
            ref = common_pb2.TensorRef(bucket=self.store.bucket, key=key, shape=list(tensor.shape),
                                       dtype=enum_from_dtype(tensor.dtype))
        if delivery in (INLINE, BOTH):
            inline = tensor_to_message(tensor, encoding)
        return ref, inline

    def put_png(self, png: bytes, key: str) -> common_pb2.ObjectRef:
        self._store().put_bytes(key, png, "image/png")
        return common_pb2.ObjectRef(bucket=self.store.bucket, key=key)


def check_count(items, limit: int, what: str) -> None:
    if len(items) == 0:
        raise ValueError(f"{what}: at least one is needed")
    if len(items) > limit:
        raise TooLarge(f"{what}: {len(items)} given; this server takes at most {limit} per request")


def check_output_keys(inputs, job_id: str) -> None:
    """Every named `output_key` of a request's inputs, before any work: a bad one must not leave the
    earlier inputs' objects written."""
    for inp in inputs:
        if inp.output_key:
            check_output_key(inp.output_key, job_id)
