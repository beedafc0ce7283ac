"""Import layering: `engine.cli` (the `tandem` command) sits above the tiers and the gateway, so
no server, engine or library module imports it; they share process helpers via engine.serving.
A static check over the source (ast), so it sees lazy imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "gateway", "prefill_service", "decode_service", "kvtransfer", "kernels",
            "protos")
ENTRY_POINT = "engine.cli"
ALLOWED = {ROOT / "engine" / "cli.py"}  # the entry point itself


def package_of(path: Path) -> str:
    """The package a source file's relative imports start from."""
    parts = path.relative_to(ROOT).parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, package: str) -> set[str]:
    """Absolute names of every module `source` (a file of `package`) imports, anywhere in it:
    `import a.b` gives a.b; `from a import b` gives a and a.b (b may be a module); relative
    imports are resolved against `package`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def importers_of(target: str) -> list[str]:
    """Source files of PACKAGES (outside ALLOWED) that import `target`."""
    return sorted(str(path.relative_to(ROOT))
                  for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
                  if path not in ALLOWED
                  and target in imported_modules(path.read_text(), package_of(path)))


@pytest.mark.parametrize("source, package", [
    ("import engine.cli", "gateway"),
    ("from engine.cli import run_until_signalled", "gateway"),
    ("from engine import cli", "decode_service"),
    ("def main():\n    from engine.cli import main", "kvtransfer"),
    ("from .cli import main", "engine"),
    ("from . import cli", "engine"),
    ("from ..cli import main", "engine.model"),
])
def test_checker_sees_every_import_form(source, package):
    assert ENTRY_POINT in imported_modules(source, package)


@pytest.mark.parametrize("source, package", [
    ("from engine.serving import run_until_signalled", "gateway"),
    ("import engine.client", "gateway"),
    ("from . import serving", "engine"),
])
def test_checker_ignores_other_modules(source, package):
    assert ENTRY_POINT not in imported_modules(source, package)


def test_nothing_imports_the_cli():
    assert importers_of(ENTRY_POINT) == [], (
        f"{ENTRY_POINT} is the top entry point: move what these modules need from it into a "
        "lower module (process helpers live in engine.serving)")
