"""services/common/ is the bottom layer: its modules import no other package of services/ (the model
packages, the orchestrator, the local tooling), at top level or inside functions, so that any of them
can use it without pulling in the others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = ROOT / "services" / "common"
ALLOWED = ("services.common",)
MODULES = sorted(p.relative_to(ROOT).as_posix() for p in COMMON.rglob("*.py"))


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, relative ones resolved, `from services import x`
    as services.x, and importlib.import_module calls with a literal name."""
    package = ".".join(path.relative_to(root).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
            if module == "services":  # `from services import llm` imports the package services.llm
                found += [(node.lineno, f"services.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def is_allowed(module: str) -> bool:
    if module == "services" or not module.startswith("services."):
        return True  # the standard library, third-party packages, and the empty top package
    return any(module == a or module.startswith(a + ".") for a in ALLOWED)


def test_every_module_is_checked():
    assert "services/common/checkpoint.py" in MODULES and "services/common/storage.py" in MODULES
    assert len(MODULES) > 10


def test_the_check_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "services" / "common"
    pkg.mkdir(parents=True)
    f = pkg / "sample.py"
    f.write_text("import services.llm.model\nfrom ..vae import model\nfrom .. import orchestrator\n"
                 "def later():\n    from services.dev.ports import free_port\n"
                 "    importlib.import_module('services.vit.model')\n"
                 "from . import config\nfrom bagel_serve.proto.bagel.v1 import common_pb2\n"
                 "from services.common.storage import ObjectStore\nimport numpy\n")
    bad = sorted({m for _, m in imported_modules(f, tmp_path) if not is_allowed(m)})
    assert bad == ["services.dev.ports", "services.llm.model", "services.orchestrator", "services.vae",
                   "services.vit.model"]


@pytest.mark.parametrize("module", MODULES)
def test_common_imports_only_common(module):
    path = ROOT / module
    bad = [f"line {line}: {name}" for line, name in imported_modules(path) if not is_allowed(name)]
    assert not bad, f"{module} imports from outside services.common: " + "; ".join(bad)
