"""resolve_max_model_len: the context length an instance serves never exceeds one sequence the
KV pool holds. An explicit --max-model-len that does not fit the pool or the model is a start-up
error; the model's own length is lowered to the pool's with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from engine.instance import InstanceConfig, resolve_max_model_len
from engine.model.config import ModelConfig

MODEL_LEN = 1024


def model(sliding_window: int | None = None) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=2000, hidden_size=64,
                       intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                       max_position_embeddings=MODEL_LEN, sliding_window=sliding_window)


def config(max_model_len: int | None = None) -> InstanceConfig:
    return InstanceConfig(model_dir=Path("unused"), served_model_name="m",
                          max_model_len=max_model_len)


def test_an_explicit_length_beyond_the_pool_is_an_error_naming_the_flag_to_raise():
    with pytest.raises(ValueError, match="--kv-cache-memory") as info:
        resolve_max_model_len(config(512), model(), pool_tokens=256)
    assert "512" in str(info.value) and "256" in str(info.value)


def test_an_explicit_length_beyond_the_model_is_an_error():
    with pytest.raises(ValueError, match="exceeds the model's 1024"):
        resolve_max_model_len(config(MODEL_LEN + 1), model(), pool_tokens=8 * MODEL_LEN)


def test_the_models_length_beyond_the_pool_is_lowered_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="engine"):
        assert resolve_max_model_len(config(), model(), pool_tokens=128) == 128
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "lowered" in record.getMessage() and "1024" in record.getMessage()
    assert "--kv-cache-memory" in record.getMessage()


def test_lengths_that_fit_are_served_as_they_are(caplog):
    with caplog.at_level(logging.WARNING, logger="engine"):
        assert resolve_max_model_len(config(), model(), pool_tokens=MODEL_LEN) == MODEL_LEN
        assert resolve_max_model_len(config(256), model(), pool_tokens=256) == 256
        assert resolve_max_model_len(config(), model(sliding_window=512), pool_tokens=4096) == 512
    assert not caplog.records
