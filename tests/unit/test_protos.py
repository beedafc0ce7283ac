"""The generated stubs match the .proto files, and the contracts follow the conventions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from protos.tandem.v1 import (common_pb2, decode_pb2, generation_pb2, instance_pb2,
                              kv_transfer_pb2, prefill_pb2)

ROOT = Path(__file__).resolve().parents[2]
MODULES = (common_pb2, decode_pb2, generation_pb2, instance_pb2, kv_transfer_pb2, prefill_pb2)


def test_generated_stubs_are_fresh():
    result = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_enum_starts_with_unspecified_and_package_is_versioned():
    for module in MODULES:
        assert module.DESCRIPTOR.package == "tandem.v1"
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name


def test_every_field_and_rpc_is_documented():
    for path in (ROOT / "protos" / "tandem" / "v1").glob("*.proto"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(
                ("option ", "syntax", "package", "reserved", "import", "//"))
            is_rpc = stripped.startswith("rpc ")
            if (is_field and not stripped.split()[0].isupper()) or is_rpc:
                above = lines[i - 1].strip()
                is_enum_value = stripped.split()[0].isupper()
                assert above.startswith("//") or is_enum_value, f"{path.name}:{i + 1} undocumented: {stripped}"
