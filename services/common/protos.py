"""The generated `bagel.v1` modules, as every role imports them:

    from services.common.protos import common_pb2, vit_pb2, vit_pb2_grpc

The code is generated when the project is built or installed (setup.py, services/common/proto_build.py)
into the `bagel_serve.proto` package; importing this module only imports it. In a checkout whose .proto
files changed since the last install, the import fails with a message saying to reinstall, instead of
serving messages that no longer match the sources.
"""

from __future__ import annotations

import importlib

from services.common.proto_build import PACKAGE, PROTO_ROOT, ProtoGenerationError, current


def _module(name: str):
    try:
        return importlib.import_module(f"{PACKAGE}.bagel.v1.{name}")
    except ImportError as e:
        raise ProtoGenerationError(
            f"the bagel.v1 code ({PACKAGE}) is generated when the project is installed and is missing here: "
            "run `pip install -e .` (scripts/setup.sh does)") from e


if PROTO_ROOT.is_dir() and not current(PROTO_ROOT):  # a checkout: its .proto files are the truth
    raise ProtoGenerationError(f"the generated {PACKAGE} code is older than the .proto files under {PROTO_ROOT}: "
                               "reinstall the project (`pip install -e .`, or scripts/setup.sh) to regenerate it")

common_pb2 = _module("common_pb2")
vit_pb2 = _module("vit_pb2")
vit_pb2_grpc = _module("vit_pb2_grpc")
vae_pb2 = _module("vae_pb2")
vae_pb2_grpc = _module("vae_pb2_grpc")
llm_pb2 = _module("llm_pb2")
llm_pb2_grpc = _module("llm_pb2_grpc")
jobs_pb2 = _module("jobs_pb2")
jobs_pb2_grpc = _module("jobs_pb2_grpc")


def service_name(module, name: str) -> str:
    """Full name of a service, e.g. service_name(vit_pb2, "ViTService") == "bagel.v1.ViTService"."""
    return module.DESCRIPTOR.services_by_name[name].full_name


__all__ = ["common_pb2", "vit_pb2", "vit_pb2_grpc", "vae_pb2", "vae_pb2_grpc", "llm_pb2", "llm_pb2_grpc",
           "jobs_pb2", "jobs_pb2_grpc", "service_name", "ProtoGenerationError"]
