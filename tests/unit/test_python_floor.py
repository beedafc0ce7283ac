"""pyproject's requires-python must not admit an interpreter the code cannot run on (issue 9 item
7: Python 3.10 was allowed while decode used asyncio.timeout, new in 3.11, and hung)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "gateway", "prefill_service", "decode_service", "kvtransfer", "kernels",
            "protos")

# Standard-library and language features Tandem may use, with the Python version that added them.
FEATURES: dict[str, tuple[tuple[int, int], re.Pattern[str]]] = {
    "asyncio.timeout": ((3, 11), re.compile(r"\basyncio\.timeout(_at)?\(")),
    "asyncio.TaskGroup": ((3, 11), re.compile(r"\basyncio\.TaskGroup\b")),
    "tomllib": ((3, 11), re.compile(r"^\s*(import|from) tomllib\b", re.M)),
    "except*": ((3, 11), re.compile(r"^\s*except\s*\*", re.M)),
    "typing.Self": ((3, 11), re.compile(r"from typing import[^\n]*\bSelf\b")),
    "enum.StrEnum": ((3, 11), re.compile(r"\bStrEnum\b")),
    "exception add_note": ((3, 11), re.compile(r"\.add_note\(")),
}


def requires_python() -> SpecifierSet:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return SpecifierSet(project["requires-python"])


def features_used() -> dict[str, list[str]]:
    """feature name -> source files of PACKAGES that use it."""
    used: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = path.read_text()
            for name, (_, pattern) in FEATURES.items():
                if pattern.search(source):
                    used.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return used


def admits_minor(spec: SpecifierSet, minor: tuple[int, int]) -> bool:
    """True when some release of Python `minor` (x.y.0 .. x.y.30) satisfies spec."""
    return any(spec.contains(f"{minor[0]}.{minor[1]}.{micro}") for micro in range(31))


def test_the_scan_finds_asyncio_timeout():
    """decode waits for KV under asyncio.timeout: the scan must see it, or the floor check
    below would pass vacuously."""
    assert "asyncio.timeout" in features_used()


def test_requires_python_excludes_versions_missing_a_used_feature():
    spec = requires_python()
    used = features_used()
    for name, files in used.items():
        added_in = FEATURES[name][0]
        too_old = [(3, minor) for minor in range(added_in[1]) if admits_minor(spec, (3, minor))]
        assert not too_old, (f"requires-python {spec} admits Python {too_old[-1][0]}."
                             f"{too_old[-1][1]}, but {name} (new in {added_in[0]}.{added_in[1]}) "
                             f"is used in {files}")


def test_this_interpreter_satisfies_requires_python():
    version = ".".join(map(str, sys.version_info[:3]))
    assert requires_python().contains(version), (version, str(requires_python()))
