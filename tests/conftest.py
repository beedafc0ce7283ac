"""Shared fixtures: real tiny models, built offline once per test session (a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.model.checkpoint import (train_metaspace_tokenizer, train_tokenizer,
                                     write_random_checkpoint)

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


@pytest.fixture(scope="session")
def metaspace_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-2-style tokenizer (Metaspace, <0xXX> byte fallback, <s> prepended, a decoder
    that strips the text's first space; ~2.3k tokens) trained once per session."""
    return train_metaspace_tokenizer(tmp_path_factory.mktemp("metaspace_tokenizer"))


@pytest.fixture(scope="session")
def metaspace_model(tmp_path_factory: pytest.TempPathFactory,
                    metaspace_tokenizer_dir: Path) -> Path:
    """A tiny random Llama as in tiny_models, with the Metaspace tokenizer (vocab = its size)
    and Llama 2's single EOS </s> (id 2; pad = <unk>, id 0). Seed 13: its greedy outputs for
    tests/e2e/test_metaspace.py's prompts start with a new word. Treat it as read-only."""
    path = write_random_checkpoint(tmp_path_factory.mktemp("metaspace_models") / "llama2-metaspace",
                                   "llama", seed=13, tokenizer_dir=metaspace_tokenizer_dir)
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return path
