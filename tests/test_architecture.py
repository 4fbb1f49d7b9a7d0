"""The import graph between qualiface's layers, read from the source (``ast``, lazy imports too).

Layers, low to high: the shared low modules (``errors``, ``files``, ..., ``scoring``), the
building blocks (``data``, ``backbones``, ``heads``, the model-package format ``package``), the
wings (``train``, ``eval``, ``infer``), and the front ends (``cli``, ``demo``). An import may only go down or stay inside its package; the wings are
siblings. A rule that the code does not meet yet is marked ``xfail(strict=True)``: the day the
move is done the test passes, pytest reports it, and the mark must go (so it stays enforced).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import qualiface

PACKAGE_ROOT = Path(qualiface.__file__).resolve().parent


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def qualiface_imports(subpackage: str) -> dict[str, set[str]]:
    """``{module: {qualiface modules it imports}}`` for every module under ``subpackage``."""
    found: dict[str, set[str]] = {}
    folder = PACKAGE_ROOT / subpackage.replace(".", "/")
    files = sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]
    for path in files:
        relative = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
        is_package = relative.name == "__init__"
        module = ".".join(relative.parts[:-1] if is_package else relative.parts)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(module, is_package, node)
                targets.add(target)
                # ``from qualiface import infer`` imports the sub-package itself
                targets.update(f"{target}.{alias.name}" for alias in node.names)
        found[module] = {t for t in targets if t == "qualiface" or t.startswith("qualiface.")}
    return found


def violations(importer: str, forbidden: tuple[str, ...]) -> list[str]:
    """``"module -> target"`` for each import from ``importer`` into any ``forbidden`` package."""
    bad = []
    for module, targets in qualiface_imports(importer).items():
        for target in sorted(targets):
            if any(target == f"qualiface.{f}" or target.startswith(f"qualiface.{f}.")
                   for f in forbidden):
                bad.append(f"{module} -> {target}")
    return bad


WINGS = ("train", "eval", "infer")
FRONT_ENDS = ("cli", "demo")


@pytest.mark.parametrize("low", ["errors", "files", "registry", "progress", "threads", "devices", "scoring"])
def test_low_modules_import_no_layer_above(low):
    assert violations(low, ("data", "backbones", "heads", *WINGS, *FRONT_ENDS)) == []


@pytest.mark.parametrize("block", ["data", "backbones", "heads", "package", "methods"])
def test_building_blocks_import_no_wing(block):
    assert violations(block, (*WINGS, *FRONT_ENDS)) == []


def test_infer_does_not_import_train():
    assert violations("infer", ("train",) + FRONT_ENDS) == []


def test_eval_imports_neither_train_nor_infer():
    assert violations("eval", ("train", "infer") + FRONT_ENDS) == []


def test_train_does_not_import_infer():
    assert violations("train", ("infer",) + FRONT_ENDS) == []


def test_infer_does_not_import_eval():
    assert violations("infer", ("eval",)) == []


def test_the_walker_sees_lazy_and_relative_imports():
    """The checker itself: an import inside a function counts as much as one at the top."""
    tree = ast.parse("def f():\n    from qualiface.infer.model import Model\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _absolute("qualiface.train.loop", False, node) == "qualiface.infer.model"
    relative = ast.parse("from ..infer import model\n").body[0]
    assert _absolute("qualiface.train.loop", False, relative) == "qualiface.infer"
    # a real lazy import: ``QGFaceMethod.second_view`` imports the degradations inside the method
    assert "qualiface.data.degrade" in qualiface_imports("methods")["qualiface.methods.qgface"]


LAZY_MARK = re.compile(r"#\s*lazy:\s*\S")


def in_function_imports(subpackage: str = "") -> list[tuple[str, int, str]]:
    """``(path, line, source)`` of each import statement inside a function under ``subpackage``."""
    found = []
    folder = PACKAGE_ROOT / subpackage.replace(".", "/") if subpackage else PACKAGE_ROOT
    for path in sorted(folder.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        relative = str(path.relative_to(PACKAGE_ROOT.parent))

        def walk(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                    source = "\n".join(lines[child.lineno - 1:child.end_lineno])
                    found.append((relative, child.lineno, source))
                walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        walk(ast.parse("\n".join(lines), str(path)), False)
    return found


def test_imports_inside_functions_outside_cli_say_why_they_are_lazy():
    """Imports go at the top; one inside a function (outside ``cli/``) carries ``# lazy: why``
    on its line: an optional dependency, an import cycle, or a heavy module kept off a light path."""
    lazy = [item for item in in_function_imports() if not item[0].startswith("qualiface/cli/")]
    assert lazy, "the walker found no in-function import at all"
    unexplained = [f"{path}:{line}: {source}" for path, line, source in lazy
                   if not LAZY_MARK.search(source)]
    assert unexplained == []


def test_cli_modules_say_that_they_import_lazily():
    """The CLI imports the library inside the commands (``qualiface --help`` stays instant) and
    each module that does so says it once in its docstring."""
    lazy_modules = {path for path, _, _ in in_function_imports("cli")}
    assert lazy_modules
    silent = []
    for relative in sorted(lazy_modules):
        doc = ast.get_docstring(ast.parse((PACKAGE_ROOT.parent / relative).read_text(encoding="utf-8"))) or ""
        if "lazily" not in doc or "--help" not in doc:
            silent.append(relative)
    assert silent == []


def test_the_lazy_import_check_sees_a_missing_reason(tmp_path, monkeypatch):
    """The checker itself: an unexplained import inside a function is reported, a marked one is not."""
    package = tmp_path / "qualiface"
    package.mkdir()
    (package / "mod.py").write_text("import os\n\ndef f():\n    import json\n\n"
                                    "def g():\n    import csv  # lazy: a reason\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_ROOT", package)
    found = in_function_imports()
    assert [(line, bool(LAZY_MARK.search(source))) for _, line, source in found] == [(4, False), (7, True)]
