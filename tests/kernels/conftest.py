"""Kernel tests run natively on a CUDA device and under the Triton interpreter elsewhere.

TRITON_INTERPRET must be set before any kernel module is imported (`triton.jit` reads it when
it decorates), so it is set here, at collection, and only when there is no GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where kernel inputs live: "cuda" when available, else "cpu" (the interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
