"""The data flows one way: the command line uses the engine, never the reverse, and only the
command line prints."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "chtsync"
CLI = PACKAGE / "cli"


def engine_modules() -> list[Path]:
    # __main__.py is `python -m chtsync`: the command line's entry point, one line.
    return sorted(p for p in PACKAGE.rglob("*.py") if not p.is_relative_to(CLI) and p.name != "__main__.py")


def imports_cli(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.startswith("chtsync.cli") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module is not None and (
                node.module.startswith("chtsync.cli")
                or (node.module == "chtsync" and any(a.name == "cli" for a in node.names))):
            return True
    return False


def prints(tree: ast.AST) -> list[int]:
    """Lines that call print(), write to sys.stdout/stderr, or make a rich Console."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (isinstance(f, ast.Name) and f.id in ("print", "Console")) or (
                isinstance(f, ast.Attribute) and f.attr == "write" and isinstance(f.value, ast.Attribute)
                and f.value.attr in ("stdout", "stderr")):
            found.append(node.lineno)
    return found


def test_no_engine_module_imports_the_command_line_or_prints() -> None:
    modules = engine_modules()
    assert len(modules) > 20
    offenders = {}
    for path in modules:
        tree = ast.parse(path.read_text(), str(path))
        if imports_cli(tree):
            offenders[str(path.relative_to(PACKAGE))] = "imports chtsync.cli"
        if lines := prints(tree):
            offenders[str(path.relative_to(PACKAGE))] = f"prints at lines {lines}"
    assert offenders == {}


def test_the_checks_see_what_they_look_for() -> None:
    assert imports_cli(ast.parse("from chtsync.cli import load_config"))
    assert imports_cli(ast.parse("from chtsync import db, cli"))
    assert prints(ast.parse("import sys\nprint('x')\nsys.stderr.write('y')")) == [2, 3]


def test_importing_the_engine_does_not_import_the_command_line() -> None:
    code = ("import sys, chtsync.pipeline, chtsync.follower, chtsync.service, chtsync.metrics, chtsync.verify;"
            " print(sorted(m for m in sys.modules if m.startswith('chtsync.cli')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == "[]"


def test_every_package_ships_in_the_wheel() -> None:
    """pyproject lists packages explicitly (for the _data mapping): a new subpackage must be there."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "chtsync").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"
