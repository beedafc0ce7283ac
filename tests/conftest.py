"""Shared fixtures: real tiny models, built offline once per test session (a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.model.checkpoint import train_tokenizer, write_random_checkpoint

TINY_ARCHES = ("llama", "mistral", "qwen2", "qwen3")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu",
                     help="torch device for the tiers in tests/services (e.g. cuda on a GPU machine)")


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> str:
    return pytestconfig.getoption("--device")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (ChatML template, ~2k tokens) trained once per session."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory,
                tiny_tokenizer_dir: Path) -> dict[str, Path]:
    """arch -> checkpoint dir, for "llama" (llama3 rope scaling), "mistral" (two safetensors
    shards), "qwen2" (tied embeddings, q/k/v bias) and "qwen3" (q/k norm, head_dim 32 with
    hidden 64 / 4 heads). All: hidden 64, 2 layers, 4 heads, 2 KV heads, float32, random
    weights with peaked logits, and the shared tokenizer. Treat the directories as read-only.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: write_random_checkpoint(root / arch, arch, seed=i,
                                          num_shards=2 if arch == "mistral" else 1,
                                          tokenizer_dir=tiny_tokenizer_dir)
            for i, arch in enumerate(TINY_ARCHES)}
