"""Config parsing, dtype resolution, load errors and the offline checkpoint builders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from engine.model import (ModelConfig, ModelLoadError, UnsupportedArchitectureError, load_model,
                          resolve_dtype)
from engine.model.checkpoint import EOS_ID, IM_END_ID, build_random_model, random_model_dir
from engine.model.rotary import compute_inv_freq

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512}


def config_of(**overrides) -> ModelConfig:
    return ModelConfig.from_dict({**BASE, **overrides})


def copy_model(src, tmp_path):
    return shutil.copytree(src, tmp_path / "model")


def test_tiny_checkpoints_parse(tiny_models):
    llama, mistral, qwen2, qwen3 = (ModelConfig.from_dir(tiny_models[a])
                                    for a in ("llama", "mistral", "qwen2", "qwen3"))
    assert llama.architecture == "LlamaForCausalLM" and llama.rope_scaling["rope_type"] == "llama3"
    assert llama.head_dim == 16 and not llama.attention_bias and not llama.tie_word_embeddings
    assert mistral.sliding_window is None and mistral.rope_theta == 1e6
    assert qwen2.tie_word_embeddings and qwen2.attention_bias and not qwen2.o_proj_bias
    assert qwen2.sliding_window is None
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.num_kv_heads == 2
    assert llama.eos_token_ids == (EOS_ID, IM_END_ID) and llama.bos_token_id == 1
    assert llama.torch_dtype == "float32" and llama.vocab_size > 1000


def test_head_dim_bias_and_sliding_window_rules():
    assert config_of().head_dim == 16
    assert config_of(head_dim=40).head_dim == 40
    assert config_of(architectures=["Qwen3ForCausalLM"]).head_dim == 128  # transformers default
    llama = config_of(attention_bias=True, mlp_bias=True)
    assert llama.attention_bias and llama.o_proj_bias and llama.mlp_bias
    assert config_of(architectures=["Qwen2ForCausalLM"], sliding_window=4096,
                     use_sliding_window=False).sliding_window is None
    assert config_of(architectures=["Qwen2ForCausalLM"], sliding_window=4096,
                     use_sliding_window=True).sliding_window == 4096
    assert config_of(architectures=["MistralForCausalLM"], sliding_window=4096).sliding_window == 4096
    assert config_of(sliding_window=4096).sliding_window is None  # Llama never slides


def test_rope_forms():
    assert (config_of().rope_theta, config_of().rope_scaling) == (10000.0, None)
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    legacy = config_of(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **llama3})
    v5 = config_of(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **llama3})
    assert legacy.rope_theta == v5.rope_theta == 500000.0
    assert legacy.rope_scaling == v5.rope_scaling == {"rope_type": "llama3", **llama3}
    plain = config_of(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert (plain.rope_theta, plain.rope_scaling) == (1e6, None)
    linear = config_of(rope_scaling={"type": "linear", "factor": 2.0})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    no_original = config_of(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    assert no_original.rope_scaling["original_max_position_embeddings"] == 512


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="yarn.*default, linear, llama3"):
        compute_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_eos_ids_union_and_dtype_key():
    config = ModelConfig.from_dict({**BASE, "eos_token_id": [7, 8], "dtype": "bfloat16"},
                                   {"eos_token_id": 9, "bos_token_id": 3})
    assert config.eos_token_ids == (7, 8, 9) and config.bos_token_id == 3
    assert config.torch_dtype == "bfloat16"
    assert ModelConfig.from_dict({**BASE, "eos_token_id": 2}, {"eos_token_id": [2]}).eos_token_ids == (2,)


def test_resolve_dtype():
    assert resolve_dtype("auto", config_of(torch_dtype="bfloat16")) is torch.bfloat16
    assert resolve_dtype("auto", config_of()) is torch.float32
    assert resolve_dtype("float16", config_of(torch_dtype="bfloat16")) is torch.float16
    assert resolve_dtype("bf16", config_of()) is torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype("int8", config_of())


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path / "nope"))):
        ModelConfig.from_dir(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="config.json not found"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*Qwen3ForCausalLM"):
        ModelConfig.from_dir(tmp_path)
    assert issubclass(UnsupportedArchitectureError, ModelLoadError)


def test_missing_weights(tiny_models, tmp_path):
    model_dir = copy_model(tiny_models["llama"], tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=re.escape(f"no weights in {model_dir}")):
        load_model(model_dir)


def test_missing_and_unexpected_tensors_are_listed(tiny_models, tmp_path):
    model_dir = copy_model(tiny_models["llama"], tmp_path)
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.extra.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as info:
        load_model(model_dir)
    assert "missing tensors (1): model.layers.1.mlp.up_proj.weight" in str(info.value)
    assert "unexpected tensors (1): model.extra.weight" in str(info.value)


def test_unsupported_rope_fails_load(tiny_models, tmp_path):
    model_dir = copy_model(tiny_models["llama"], tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="yarn"):
        load_model(model_dir)


def test_sharded_checkpoint_and_tied_embeddings(tiny_models):
    assert (tiny_models["mistral"] / "model.safetensors.index.json").is_file()
    load_model(tiny_models["mistral"])
    qwen2, _ = load_model(tiny_models["qwen2"])
    assert qwen2.lm_head.weight is qwen2.model.embed_tokens.weight


def test_tokenizer_round_trip(tiny_models):
    tokenizer = Tokenizer.from_file(str(tiny_models["llama"] / "tokenizer.json"))
    for text in ["Hello, world!", "Grüße aus München", "我们今天去公园", "🙂🚀 ok", "  \n\t x"]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert len(tokenizer.encode("🚀").ids) > 1 and len(tokenizer.encode("公园").ids) > 1
    assert tokenizer.token_to_id("<|im_end|>") == IM_END_ID


def test_default_model_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    assert random_model_dir() == tmp_path / "tandem-tiny-llama"
    path = build_random_model(tmp_path)
    assert path == random_model_dir()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_random_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["tandem-tiny-llama"]  # no staging left
    config = ModelConfig.from_dir(path)
    assert (config.architecture, config.hidden_size, config.num_layers) == ("LlamaForCausalLM", 256, 4)


def test_checkpoint_module_does_not_import_transformers():
    code = "import sys, engine.model.checkpoint; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtin_pair_ships_in_the_package_and_runs_in_float32_under_auto(tmp_path):
    from engine.cli import resolve_dtype_flag, resolve_model_dir
    from engine.model.checkpoint import builtin_draft_dir, builtin_model_dir, is_builtin_model

    target, draft = resolve_model_dir(None), builtin_draft_dir()
    assert target == builtin_model_dir() and is_builtin_model(target) and is_builtin_model(draft)
    for model_dir in (target, draft):
        config = ModelConfig.from_dir(model_dir)
        assert config.architecture == "LlamaForCausalLM" and config.torch_dtype == "bfloat16"
    assert ModelConfig.from_dir(draft).vocab_size == ModelConfig.from_dir(target).vocab_size
    assert (target / "tokenizer.json").read_bytes() == (draft / "tokenizer.json").read_bytes()
    assert resolve_dtype_flag("auto", target) == "float32"
    assert resolve_dtype_flag("bfloat16", target) == "bfloat16"  # an explicit --dtype wins
    assert resolve_dtype_flag("auto", tmp_path) == "auto"
    assert not is_builtin_model(tmp_path)
