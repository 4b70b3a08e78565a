"""Tensors to and from bytes: single-tensor safetensors files and the inline `bagel.v1.Tensor` message.

Never pickle. Every decode checks what it reads (dtype known, shape sane, byte count consistent, the
declared shape/dtype equal to the payload's) and raises TensorCodecError, a ValueError, with a message
that names the field, so a server can answer INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from services.common.contracts import InputError

TENSOR_NAME = "tensor"  # the one key of a single-tensor safetensors file we write
MAX_DIMS = 8
MAX_DIM = 1 << 31

# Proto enum value (bagel.v1.DType) <-> torch dtype. Numbers as in common.proto.
_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.bfloat16, 3: torch.float16, 4: torch.int32, 5: torch.int64, 6: torch.uint8,
    7: torch.bool,
}
_ENUMS = {v: k for k, v in _DTYPES.items()}
RAW, SAFETENSORS = 0, 1  # bagel.v1.TensorEncoding


class TensorCodecError(InputError):
    """A tensor payload is malformed or not what the caller expected."""


def dtype_from_enum(value: int, where: str = "tensor") -> torch.dtype:
    try:
        return _DTYPES[value]
    except KeyError:
        raise TensorCodecError(f"{where}: dtype {_enum_name(value)} is not a valid tensor dtype "
                               f"(use one of {sorted(_enum_name(v) for v in _DTYPES)})") from None


def enum_from_dtype(dtype: torch.dtype) -> int:
    try:
        return _ENUMS[dtype]
    except KeyError:
        raise TensorCodecError(f"dtype {dtype} cannot be sent; supported: {sorted(map(str, _ENUMS))}") from None


def _enum_name(value: int) -> str:
    from services.common.protos import common_pb2

    try:
        return common_pb2.DType.Name(value)
    except ValueError:
        return str(value)


def check_shape(shape: Sequence[int], where: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_DIMS or any(d < 0 or d > MAX_DIM for d in shape):
        raise TensorCodecError(f"{where}: shape {list(shape)} is invalid (at most {MAX_DIMS} dims, each in "
                               f"[0, {MAX_DIM}])")
    return shape


# ---- safetensors ---------------------------------------------------------------------------------
def tensor_to_safetensors(tensor: torch.Tensor, name: str = TENSOR_NAME) -> bytes:
    return st_save({name: tensor.detach().cpu().contiguous()}, metadata={"format": "pt"})


def safetensors_to_tensor(data: bytes, where: str = "tensor") -> torch.Tensor:
    """The single tensor of a safetensors file, whatever its name."""
    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise TensorCodecError(f"{where}: not a valid safetensors payload: {e}") from None
    if len(tensors) != 1:
        raise TensorCodecError(f"{where}: expected exactly one tensor in the safetensors payload, found "
                               f"{len(tensors)} ({sorted(tensors)[:4]})")
    (tensor,) = tensors.values()
    if tensor.dtype not in _ENUMS:
        raise TensorCodecError(f"{where}: stored dtype {tensor.dtype} is not supported")
    return tensor


# ---- the inline message --------------------------------------------------------------------------
def tensor_to_message(tensor: torch.Tensor, encoding: int = RAW):
    """torch tensor -> bagel.v1.Tensor (raw little-endian bytes, or a safetensors file)."""
    from services.common.protos import common_pb2

    t = tensor.detach().cpu().contiguous()
    msg = common_pb2.Tensor(shape=list(t.shape), dtype=enum_from_dtype(t.dtype), encoding=encoding)
    if encoding == SAFETENSORS:
        msg.data = tensor_to_safetensors(t)
    elif encoding == RAW:
        _require_little_endian()
        msg.data = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    else:
        raise TensorCodecError(f"unknown tensor encoding {encoding}")
    return msg


def tensor_from_message(msg, where: str = "tensor") -> torch.Tensor:
    """bagel.v1.Tensor -> torch tensor, checking the declared shape/dtype against the bytes."""
    if msg.encoding == SAFETENSORS:
        tensor = safetensors_to_tensor(msg.data, where)
        check_declared(tensor, msg.shape, msg.dtype, where, shape_given=len(msg.shape) > 0)
        return tensor
    if msg.encoding != RAW:
        raise TensorCodecError(f"{where}: unknown tensor encoding {msg.encoding}")
    dtype = dtype_from_enum(msg.dtype, where)
    shape = check_shape(msg.shape, where)
    if not shape and len(msg.data) != _itemsize(dtype):
        raise TensorCodecError(f"{where}: a raw tensor needs its shape (got none for {len(msg.data)} bytes)")
    expected = math.prod(shape) * _itemsize(dtype)
    if len(msg.data) != expected:
        raise TensorCodecError(f"{where}: shape {list(shape)} of {str(dtype).removeprefix('torch.')} needs "
                               f"{expected} bytes, got {len(msg.data)}")
    _require_little_endian()
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)


def check_declared(tensor: torch.Tensor, shape: Sequence[int], dtype: int, where: str,
                   shape_given: bool = True) -> None:
    """A payload must be what its envelope (TensorRef / Tensor fields) says; unset fields are not checked."""
    if shape_given and tuple(tensor.shape) != tuple(shape):
        raise TensorCodecError(f"{where}: declared shape {list(shape)} but the payload holds {list(tensor.shape)}")
    if dtype and dtype_from_enum(dtype, where) != tensor.dtype:
        raise TensorCodecError(f"{where}: declared dtype {_enum_name(dtype)} but the payload holds "
                               f"{_enum_name(enum_from_dtype(tensor.dtype))}")


def expect(tensor: torch.Tensor, shape: Sequence[int | None], dtypes: Sequence[torch.dtype], where: str,
           finite: bool = False) -> None:
    """Check a decoded tensor against what the consumer needs; None in `shape` accepts any size. finite:
    refuse NaN and inf (a model fed them answers NaN pixels, not an error)."""
    if tensor.dtype not in dtypes:
        raise TensorCodecError(f"{where}: dtype must be one of {[_enum_name(_ENUMS[d]) for d in dtypes]}, got "
                               f"{_enum_name(_ENUMS[tensor.dtype])}")
    want = ["*" if d is None else d for d in shape]
    if tensor.dim() != len(shape) or any(d is not None and d != s for d, s in zip(shape, tensor.shape)):
        raise TensorCodecError(f"{where}: shape must be {want}, got {list(tensor.shape)}")
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise TensorCodecError(f"{where}: values must be finite, found NaN or inf")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _require_little_endian() -> None:
    if sys.byteorder != "little":  # every platform we deploy on is little-endian; refuse rather than guess
        raise TensorCodecError("raw tensor bytes are little-endian; this host is big-endian")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 [3, H, W] in [-1, 1], in the same operation order as ToTensor + Normalize."""
    x = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)  # [3, H, W]
    x = x.to(torch.float32).div(255)
    return x.sub(0.5).div(0.5)


__all__ = ["TensorCodecError", "to_tensor", "tensor_to_safetensors", "safetensors_to_tensor", "tensor_to_message",
           "tensor_from_message", "check_declared", "expect", "dtype_from_enum", "enum_from_dtype", "RAW",
           "SAFETENSORS"]
