"""The generated `bagel.v1` modules, generated on first import from proto/ with the pinned grpcio-tools.

Output goes to the git-ignored `services/_generated/`. It is regenerated when a stamp (a hash of the
.proto sources and the grpcio-tools / protobuf versions) no longer matches, so editing a .proto or
upgrading the pins is picked up on the next import, and a checkout's mtimes do not matter. Generation
runs under a file lock, into a scratch folder, and moves finished files into place.

protoc writes `from bagel.v1 import common_pb2`; those imports are rewritten to
`services._generated.bagel.v1` so the generated code lives inside this package, not at top level.

    from services.common.protos import common_pb2, vit_pb2, vit_pb2_grpc
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import re
import shutil
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
GENERATED_ROOT = Path(__file__).resolve().parents[1] / "_generated"
PACKAGE = "services._generated"
PROTO_PACKAGE_DIR = Path("bagel") / "v1"
STAMP = ".stamp"
_IMPORT_RE = re.compile(r"^(\s*)from bagel\.v1 import ", re.MULTILINE)


class ProtoGenerationError(RuntimeError):
    """protoc failed; the message holds its output."""


def _tool_versions() -> str:
    from importlib.metadata import version

    return f"grpcio-tools={version('grpcio-tools')} protobuf={version('protobuf')}"


def _sources(proto_root: Path) -> list[Path]:
    return sorted((proto_root / PROTO_PACKAGE_DIR).glob("*.proto"))


def _stamp(proto_root: Path) -> str:
    h = hashlib.sha256(_tool_versions().encode())
    for path in _sources(proto_root):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _run_protoc(proto_root: Path, sources: list[Path], out: Path) -> None:
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"  # the well-known types shipped with grpcio-tools
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *(str(p.relative_to(proto_root)) for p in sources)]
    if protoc.main(args) != 0:  # protoc has printed its errors on stderr
        raise ProtoGenerationError(f"grpc_tools.protoc failed on {[p.name for p in sources]} (see stderr above)")


def generate(proto_root: Path = PROTO_ROOT, out_root: Path = GENERATED_ROOT, package: str = PACKAGE) -> bool:
    """Generate when missing or stale; returns True when it (re)generated."""
    sources = _sources(proto_root)
    if not sources:
        if (out_root / STAMP).is_file():
            return False  # an installed copy without proto/: use what was generated at build time
        raise ProtoGenerationError(f"no .proto files under {proto_root / PROTO_PACKAGE_DIR}")
    stamp = _stamp(proto_root)
    if _read(out_root / STAMP) == stamp:
        return False
    out_root.mkdir(parents=True, exist_ok=True)
    with open(out_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read(out_root / STAMP) == stamp:  # another process did it while we waited
            return False
        scratch = Path(tempfile.mkdtemp(prefix=".gen-", dir=out_root))
        try:
            _run_protoc(proto_root, sources, scratch)
            target = out_root / PROTO_PACKAGE_DIR
            target.mkdir(parents=True, exist_ok=True)
            for d in (out_root, out_root / "bagel", target):
                (d / "__init__.py").touch()
            for f in sorted((scratch / PROTO_PACKAGE_DIR).iterdir()):
                text = _IMPORT_RE.sub(lambda m: f"{m.group(1)}from {package}.bagel.v1 import ", f.read_text())
                tmp = target / f".{f.name}.tmp"
                tmp.write_text(text)
                tmp.replace(target / f.name)  # atomic per file: a concurrent import sees old or new
            (out_root / STAMP).write_text(stamp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    importlib.invalidate_caches()
    return True


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


generate()

common_pb2 = importlib.import_module(f"{PACKAGE}.bagel.v1.common_pb2")
vit_pb2 = importlib.import_module(f"{PACKAGE}.bagel.v1.vit_pb2")
vit_pb2_grpc = importlib.import_module(f"{PACKAGE}.bagel.v1.vit_pb2_grpc")
vae_pb2 = importlib.import_module(f"{PACKAGE}.bagel.v1.vae_pb2")
vae_pb2_grpc = importlib.import_module(f"{PACKAGE}.bagel.v1.vae_pb2_grpc")
llm_pb2 = importlib.import_module(f"{PACKAGE}.bagel.v1.llm_pb2")
llm_pb2_grpc = importlib.import_module(f"{PACKAGE}.bagel.v1.llm_pb2_grpc")
jobs_pb2 = importlib.import_module(f"{PACKAGE}.bagel.v1.jobs_pb2")
jobs_pb2_grpc = importlib.import_module(f"{PACKAGE}.bagel.v1.jobs_pb2_grpc")


def service_name(module, name: str) -> str:
    """Full name of a service, e.g. service_name(vit_pb2, "ViTService") == "bagel.v1.ViTService"."""
    return module.DESCRIPTOR.services_by_name[name].full_name


__all__ = ["common_pb2", "vit_pb2", "vit_pb2_grpc", "vae_pb2", "vae_pb2_grpc", "llm_pb2", "llm_pb2_grpc",
           "jobs_pb2", "jobs_pb2_grpc",
           "generate", "service_name", "ProtoGenerationError"]
