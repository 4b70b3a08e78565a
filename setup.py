"""Build step beyond pyproject.toml: generate the bagel.v1 protobuf / gRPC code from proto/ into
bagel_serve/proto/ when the project is built or installed (services/common/proto_build.py), so nothing
is generated when a module is imported. Everything else is declared in pyproject.toml."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    def run(self):
        super().run()
        sys.path.insert(0, str(ROOT))  # the generator is plain Python in this tree (needs grpcio-tools only)
        from services.common.proto_build import PACKAGE, PROTO_ROOT, generate

        # An editable install imports from this tree; a wheel gets the code in its build folder.
        out = ROOT if self.editable_mode else Path(self.build_lib)
        generate(PROTO_ROOT, out.joinpath(*PACKAGE.split(".")), PACKAGE)


setup(cmdclass={"build_py": BuildPyWithProtos})
