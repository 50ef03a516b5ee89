"""The package's seams stay public: no module of upscaler/ or scripts/ uses another module's private name."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_ours(module: str | None, level: int) -> bool:
    return level > 0 or (module or "").split(".")[0] == "upscaler"


def cross_module_private_uses(path: Path, root: Path = ROOT) -> list[str]:
    """`from .x import _name` and `x._name` where `x` is a module of the package, in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[str] = []
    modules: set[str] = set()  # local names bound to upscaler modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _is_ours(node.module, node.level):
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: imports {alias.name} from "
                                 f"{'.' * node.level}{node.module or ''}")
                elif alias.name[:1].islower():  # `from . import ggml`, `from upscaler import cli`
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "upscaler":
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):  # upscaler.cli._x
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append(f"{path.relative_to(root)}:{node.lineno}: uses {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    files = sorted((ROOT / "upscaler").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
    assert files
    found = [line for f in files for line in cross_module_private_uses(f)]
    assert found == []


def test_the_check_finds_private_imports(tmp_path: Path) -> None:
    """It can fail: both forms are caught, public names and dunders are not."""
    bad = tmp_path / "probe.py"
    bad.write_text("from .plan import _hidden, public\nfrom . import ggml\nimport upscaler.cli as c\n"
                   "x = ggml._lib()\ny = c._warn\nz = ggml.__name__\n", encoding="utf-8")
    found = cross_module_private_uses(bad, tmp_path)
    assert sorted(f.split(": ", 1)[1] for f in found) == ["imports _hidden from .plan", "uses c._warn", "uses ggml._lib"]
