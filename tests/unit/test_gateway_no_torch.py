"""The gateway and the torch-free engine modules must not import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("gateway.app", "gateway.grpc_api", "gateway.server", "engine.tokenizer",
           "engine.detokenizer")


def test_gateway_does_not_import_torch() -> None:
    code = (f"import sys\nimport {', '.join(MODULES)}\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_cli_parser_needs_no_server_libraries() -> None:
    """`tandem bench|prefill|decode` run where uvicorn/FastAPI are absent (the GPU image)."""
    code = ("import sys\nfrom engine.cli import build_parser\nbuild_parser()\n"
            "loaded = [m for m in ('uvicorn', 'fastapi', 'pydantic', 'torch') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
