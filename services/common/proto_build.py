"""Generating the `bagel.v1` Python code from proto/ with the pinned grpcio-tools: run when the project is
built or installed (setup.py's build step), never when a module is imported.

Output goes to `bagel_serve/proto/` (git-ignored in a checkout; inside the wheel when built). A stamp (a
hash of the .proto sources and the grpcio-tools / protobuf versions) records what it was made from, so a
build that finds it current does nothing, and services/common/protos.py can tell a checkout whose .proto
files changed since. Generation runs under a file lock, into a scratch folder, and moves finished files
into place.

protoc writes `from bagel.v1 import common_pb2`; those imports are rewritten to `bagel_serve.proto.bagel.v1`
so the generated code lives in this project's namespace, not at top level. This module needs only the
standard library and grpcio-tools: the build runs it before anything else is installed.
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
GENERATED_ROOT = Path(__file__).resolve().parents[2] / "bagel_serve" / "proto"
PACKAGE = "bagel_serve.proto"
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
            for d in (out_root / "bagel", target):
                (d / "__init__.py").touch()
            init = out_root / "__init__.py"
            if not init.exists():
                init.write_text('"""The bagel.v1 protobuf and gRPC code, generated from proto/ when the project is built."""\n')
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


def current(proto_root: Path = PROTO_ROOT, out_root: Path = GENERATED_ROOT) -> bool:
    """Whether the generated code is there and made from these .proto files and tool versions."""
    return _read(out_root / STAMP) == _stamp(proto_root)


def main() -> int:
    """`python -m services.common.proto_build`: generate into this checkout (what an install does)."""
    print("generated" if generate() else "up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
