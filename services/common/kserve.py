"""The KServe v2 / Triton gRPC inference protocol (`inference.GRPCInferenceService`) for a model server.

The servicer translates the protocol (health, metadata, typed tensors, BYTES framing, raw contents)
and calls a plain function per model: `infer(inputs: {name: np.ndarray}, parameters, context) ->
{name: np.ndarray}`. Outputs go on `raw_output_contents`, which is what tritonclient reads.

BYTES tensors: each element is a 4-byte little-endian length followed by the bytes (raw form), or one
entry of `contents.bytes_contents`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.contracts import InputError, ModelNotFound, NotReady

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

# KServe datatype -> (numpy dtype, the InferTensorContents field for the non-raw form)
DATATYPES: dict[str, tuple[np.dtype, str]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents"),
    "UINT8": (np.dtype(np.uint8), "uint_contents"),
    "INT32": (np.dtype(np.int32), "int_contents"),
    "INT64": (np.dtype(np.int64), "int64_contents"),
    "FP16": (np.dtype(np.float16), ""),
    "FP32": (np.dtype(np.float32), "fp32_contents"),
    "FP64": (np.dtype(np.float64), "fp64_contents"),
    "BYTES": (np.dtype(object), "bytes_contents"),
}
_DATATYPE_OF = {np.dtype(d): name for name, (d, _) in DATATYPES.items() if name != "BYTES"}


class KServeInputError(InputError):
    """A ModelInfer request does not fit the model's declared inputs."""


@dataclass
class TensorSpec:
    name: str
    datatype: str            # KServe name: FP32, INT32, UINT8, BYTES...
    shape: list[int]         # -1 = any size


@dataclass
class KServeModel:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    infer: Callable[[dict[str, np.ndarray], dict[str, object], grpc.ServicerContext], dict[str, np.ndarray]]
    platform: str = "pytorch"
    versions: list[str] = field(default_factory=lambda: ["1"])


def package_version() -> str:
    try:
        return version("bagel-serve")
    except PackageNotFoundError:
        return "0.0.0"


# ---- tensor framing ------------------------------------------------------------------------------
def deserialize_bytes(raw: bytes, where: str) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise KServeInputError(f"{where}: truncated BYTES element length at offset {i}")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise KServeInputError(f"{where}: BYTES element of {n} bytes overruns the tensor at offset {i}")
        out.append(bytes(raw[i:i + n]))
        i += n
    return out


def serialize_bytes(items) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + bytes(b) for b in items)


def _parameters(params) -> dict[str, object]:
    out = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def decode_inputs(request, model: KServeModel) -> dict[str, np.ndarray]:
    specs = {s.name: s for s in model.inputs}
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise KServeInputError(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        where = f"input {tensor.name!r}"
        spec = specs.get(tensor.name)
        if spec is None:
            raise KServeInputError(f"{where}: model {model.name!r} has no such input (inputs: {sorted(specs)})")
        if tensor.datatype != spec.datatype:
            raise KServeInputError(f"{where}: datatype must be {spec.datatype}, got {tensor.datatype}")
        shape = [int(d) for d in tensor.shape]
        if len(shape) != len(spec.shape) or any(w not in (-1, d) for w, d in zip(spec.shape, shape)) \
                or any(d < 0 for d in shape):
            raise KServeInputError(f"{where}: shape must be {spec.shape} (-1 = any), got {shape}")
        count = int(np.prod(shape)) if shape else 1
        dtype, field_name = DATATYPES[spec.datatype]
        if request.raw_input_contents:
            raw = request.raw_input_contents[i]
            if spec.datatype == "BYTES":
                values = deserialize_bytes(raw, where)
            else:
                if len(raw) != count * dtype.itemsize:
                    raise KServeInputError(f"{where}: shape {shape} of {spec.datatype} needs {count * dtype.itemsize} "
                                           f"bytes, got {len(raw)}")
                out[tensor.name] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
                continue
        else:
            if not field_name:
                raise KServeInputError(f"{where}: {spec.datatype} must be sent in raw_input_contents")
            values = list(getattr(tensor.contents, field_name))
        if len(values) != count:
            raise KServeInputError(f"{where}: shape {shape} needs {count} elements, got {len(values)}")
        arr = np.empty(count, dtype=object) if spec.datatype == "BYTES" else np.asarray(values, dtype=dtype)
        if spec.datatype == "BYTES":
            arr[:] = values
        out[tensor.name] = arr.reshape(shape)
    missing = sorted(set(specs) - set(out))
    if missing:
        raise KServeInputError(f"model {model.name!r} needs input(s) {missing}")
    return out


def _encode_output(name: str, array: np.ndarray):
    if array.dtype == object:
        datatype, raw = "BYTES", serialize_bytes(array.reshape(-1))
    else:
        datatype = _DATATYPE_OF[array.dtype]
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return service_pb2.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(array.shape)), raw


def _tensor_metadata(spec: TensorSpec):
    return service_pb2.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


# ---- the servicer --------------------------------------------------------------------------------
class KServeServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """ServerLive/Ready, ModelReady, Server/ModelMetadata and ModelInfer; the rest stay UNIMPLEMENTED."""

    def __init__(self, server_name: str, models: list[KServeModel], is_ready: Callable[[], bool]):
        self.server_name, self.is_ready = server_name, is_ready
        self.models = {m.name: m for m in models}

    def _model(self, name: str, version: str) -> KServeModel:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {sorted(self.models)}")
        if version and version not in model.versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r} (versions: {model.versions})")
        return model

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.is_ready())

    def ModelReady(self, request, context):
        known = request.name in self.models and (not request.version or
                                                 request.version in self.models[request.name].versions)
        return service_pb2.ModelReadyResponse(ready=known and self.is_ready())

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name=self.server_name, version=package_version(), extensions=[])

    def ModelMetadata(self, request, context):
        model = self._model(request.name, request.version)
        return service_pb2.ModelMetadataResponse(name=model.name, versions=model.versions, platform=model.platform,
                                                 inputs=[_tensor_metadata(s) for s in model.inputs],
                                                 outputs=[_tensor_metadata(s) for s in model.outputs])

    def ModelInfer(self, request, context):
        model = self._model(request.model_name, request.model_version)
        if not self.is_ready():
            raise NotReady("the model is still loading; retry shortly")
        inputs = decode_inputs(request, model)
        results = model.infer(inputs, _parameters(request.parameters), context)
        wanted = [o.name for o in request.outputs] or [s.name for s in model.outputs]
        unknown = sorted(set(wanted) - set(results))
        if unknown:
            raise KServeInputError(f"model {model.name!r} has no output(s) {unknown}")
        response = service_pb2.ModelInferResponse(model_name=model.name,
                                                  model_version=request.model_version or model.versions[-1],
                                                  id=request.id)
        for name in wanted:
            meta, raw = _encode_output(name, results[name])
            response.outputs.append(meta)
            response.raw_output_contents.append(raw)
        return response


def add_kserve(server, servicer: KServeServicer) -> None:
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


__all__ = ["KServeModel", "KServeServicer", "TensorSpec", "KServeInputError", "SERVICE_NAME", "add_kserve",
           "serialize_bytes", "deserialize_bytes"]
