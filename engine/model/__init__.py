"""Model code (Llama, Mistral, Qwen2, Qwen3) over the paged KV cache, and weight loading.

`ModelConfig` and the errors import without torch; `load_model` and `CausalLM` are imported
on first use, so the torch-free tiers can read a checkpoint's config.
"""

from engine.model.config import (SUPPORTED_ARCHITECTURES, ModelConfig, ModelLoadError,
                                 UnsupportedArchitectureError, resolve_dtype)

__all__ = ["SUPPORTED_ARCHITECTURES", "CausalLM", "ModelConfig", "ModelLoadError",
           "UnsupportedArchitectureError", "load_model", "resolve_dtype"]


def __getattr__(name: str):
    if name == "load_model":
        from engine.model.loader import load_model
        return load_model
    if name == "CausalLM":
        from engine.model.llama import CausalLM
        return CausalLM
    raise AttributeError(f"module 'engine.model' has no attribute {name!r}")
