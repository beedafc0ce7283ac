"""transformers as the reference: greedy generate() on the same checkpoint."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Generated ids (EOS included if it stopped there), exactly as transformers produces them."""
    model = hf_model(Path(model_dir))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=model.generation_config.pad_token_id or 0)
    return out[0, len(prompt_ids):].tolist()


def prompt_ids(seed: int, length: int, vocab_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab_size, (length,), generator=generator).tolist()


@functools.lru_cache(maxsize=8)
def hf_model_in(model_dir: Path, dtype: str):
    """transformers' model for model_dir with its weights in `dtype` ("bfloat16", "float16", ...)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.eval()


def hf_logits(model_dir: Path, token_ids: list[int], dtype: str = "float32") -> torch.Tensor:
    """transformers' logits for every position of token_ids ([len, vocab], as float32), computed
    in `dtype` in one forward pass."""
    model = hf_model_in(Path(model_dir), dtype)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()
