"""Offline builders for tiny checkpoints: a byte-level BPE tokenizer trained on a built-in corpus
(and a Llama-2-style Metaspace one, for tests), and random-weight Llama/Mistral/Qwen2/Qwen3
checkpoints in the Hugging Face layout.

Used by the tests and for the built-in default model. Nothing is downloaded and transformers is
never imported. The random weights are scaled so that logits are peaked (top-1/top-2 gaps far
above float rounding), which keeps greedy outputs stable across implementations.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")  # ids 0..4
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(5)
RANDOM_MODEL_NAME = "tandem-tiny-llama"
# ChatML; with `tools`, a Hermes-style system block lists them (as Qwen2.5's template), and an
# assistant message's tool_calls render as <tool_call> blocks.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions. Function signatures are within "
    "<tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a JSON object with the function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}{{- part['text'] }}{%- endfor %}{%- endif %}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{{- '\\n<tool_call>\\n{\"name\": ' + call['function']['name'] | tojson"
    " + ', \"arguments\": ' }}"
    "{%- if call['function']['arguments'] is string %}{{- call['function']['arguments'] }}"
    "{%- else %}{{- call['function']['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_ARCHES = {  # short name -> (architectures[0], model_type)
    "llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
_BASE_CONFIG = {
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "initializer_range": 0.02, "attention_dropout": 0.0,
    "use_cache": True, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
}
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more can out up who said do about into them time some could what only other these two may "
    "first then any like now over such our even most made after also did many before must "
    "model token server cache block request stream decode prefill queue batch memory latency"
).split()
_SYLLABLES = "ka lo mi ne ru sa te vo pa di ber ton lin gra sho mer qua zel fin dor".split()
_ACCENTS = str.maketrans("aeiou", "áéïõü")
_SCRIPTS = ((0x4E00, 0x9FFF), (0x3041, 0x3096), (0xAC00, 0xD7A3), (0x0410, 0x044F),
            (0x1F600, 0x1F64F), (0x1F680, 0x1F6C5))  # CJK, kana, hangul, cyrillic, emoji
_CODE = ("def add(a, b):\n    return a + b\n", 'print("hello, world")\n',
         '{"key": [1, 2, 3], "ok": true}\n', "for i in range(10):\n    total += i * 2\n")


def _corpus(num_lines: int = 6000, seed: int = 0) -> Iterator[str]:
    """Deterministic English-ish text (Zipf-weighted real and made-up words, numbers, code),
    plus a little random-character text in other scripts: too rare to merge into whole
    characters, so CJK, accented Latin and emoji stay multi-token (byte fallback)."""
    rng = random.Random(seed)
    made_up = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
               for _ in range(3000)]
    vocab = list(_WORDS) + made_up
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    for i in range(num_lines):
        if i % 40 == 0:
            low, high = rng.choice(_SCRIPTS)
            yield "".join(chr(rng.randint(low, high)) for _ in range(rng.randint(2, 8))) + " "
        elif i % 40 == 1:
            yield " ".join(rng.choices(_WORDS, k=6)).translate(_ACCENTS) + "\n"
        elif i % 12 == 0:
            yield rng.choice(_CODE)
        else:
            words = rng.choices(vocab, weights, k=rng.randint(4, 16))
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 5000)))
            yield " ".join(words).capitalize() + rng.choice(".,?!;:") + "\n"


def train_tokenizer(out_dir: str | Path, vocab_size: int = 2048,
                    model_max_length: int = 1024) -> Path:
    """Trains a byte-level BPE tokenizer on the built-in corpus; writes tokenizer.json and
    tokenizer_config.json (ChatML chat_template, PreTrainedTokenizerFast) into out_dir.

    Special tokens get ids 0..4 in SPECIAL_TOKENS order; no token is added around encoded text,
    and decode(encode(s)) == s for any string. Returns out_dir.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length, "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


METASPACE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0..2, as in Llama 2
_METASPACE_SENTENCES = ("Hello world, this is a test.", "the cat sat on the mat",
                        "héllo naïve café", "numbers 123 456")
# Characters with a token of their own (by code point); any other one is <0xXX> byte tokens. A
# fixed alphabet keeps training deterministic (limit_alphabet alone breaks frequency ties by
# hash order).
_METASPACE_ALPHABET = [chr(c) for c in range(0x21, 0x7F)] + ["\n", "▁", *"áéïõü"]


def train_metaspace_tokenizer(out_dir: str | Path, vocab_size: int = 2048,
                              model_max_length: int = 1024) -> Path:
    """Trains a Llama-2-style (SentencePiece-like) tokenizer on the built-in corpus; writes
    tokenizer.json and tokenizer_config.json (PreTrainedTokenizerFast, no chat template) into
    out_dir. Returns out_dir.

    Metaspace pre-tokenizer ("▁" replaces spaces, prepended to the first word), BPE with
    <0xXX> byte fallback for characters outside its alphabet (printable ASCII, newline, "▁" and
    a few accented vowels; CJK and emoji are one token per UTF-8 byte), and the decoder
    Replace + ByteFallback + Fuse + Strip, which drops the text's first leading space: decoding
    generated ids without the prompt loses the space of the first word. Special tokens get ids
    0..2 in METASPACE_SPECIAL_TOKENS order; encode adds <s> in front; the 256 byte tokens follow
    the vocab_size trained ones. Deterministic: the same files on every run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=_METASPACE_ALPHABET,
                                  limit_alphabet=len(_METASPACE_ALPHABET),
                                  special_tokens=list(METASPACE_SPECIAL_TOKENS),
                                  show_progress=False)
    tokenizer.train_from_iterator([*_METASPACE_SENTENCES * 30, *_corpus()], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"].update(byte_fallback=True, fuse_unk=True)
    spec["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)]).__getstate__())
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _arch_flavour(short_arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """Per-arch config.json keys: Llama uses llama3 rope scaling (active from 1/16 of the
    context), Qwen2 ties embeddings, Qwen3 has head_dim = 2 * hidden / heads."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    if short_arch == "llama":
        original = max(16, config["max_position_embeddings"] // 16)
        return {"rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": original}}
    if short_arch == "mistral":
        return {"sliding_window": None, "head_dim": head_dim}
    qwen = {"use_sliding_window": False, "sliding_window": None,
            "max_window_layers": config["num_hidden_layers"]}
    if short_arch == "qwen2":
        return {**qwen, "tie_word_embeddings": True}
    return {**qwen, "head_dim": 2 * head_dim, "attention_bias": False}


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Random tensors named and shaped like the HF checkpoint of `config` (config.json dict),
    in its torch_dtype. Projections ~N(0, 1.2/sqrt(fan_in)), embeddings ~N(0, 1), lm_head
    ~N(0, 4/sqrt(hidden)) (peaked logits), norms ~1 + N(0, 0.05), biases ~N(0, 0.05)."""
    import torch

    from engine.attention import TorchAttentionBackend
    from engine.model.config import ModelConfig
    from engine.model.llama import CausalLM

    model_config = ModelConfig.from_dict(config)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in
                  CausalLM(model_config, TorchAttentionBackend()).state_dict().items()}
    if model_config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, config["torch_dtype"])
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.05 * noise
        elif name.endswith(".bias"):
            tensor = 0.05 * noise
        elif name == "model.embed_tokens.weight":
            tensor = noise
        elif name == "lm_head.weight":
            tensor = noise * (4.0 / shape[1] ** 0.5)
        else:
            tensor = noise * (1.2 / shape[1] ** 0.5)
        tensors[name] = tensor.to(dtype).contiguous()
    return tensors


def write_random_checkpoint(out_dir: str | Path, arch: str, *, hidden_size: int = 64,
                            num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                            intermediate_size: int = 128, vocab_size: int | None = None,
                            max_position_embeddings: int = 1024, seed: int = 0,
                            dtype: str = "float32", num_shards: int = 1,
                            tokenizer_dir: str | Path | None = None,
                            **arch_overrides: Any) -> Path:
    """Writes a complete tiny checkpoint (config.json, generation_config.json, safetensors
    weights, sharded with an index when num_shards > 1, tokenizer files) into out_dir.

    tokenizer_dir: copy the tokenizer from there (e.g. a cached train_tokenizer output) instead
    of training one. vocab_size defaults to the tokenizer's size and may not be smaller.
    arch: "llama" | "mistral" | "qwen2" | "qwen3" or the class name. arch_overrides are raw
    config.json keys; they win over the per-arch flavour (see _arch_flavour). Returns out_dir.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _install_tokenizer(out_dir, tokenizer_dir, max_position_embeddings)
    tokenizer_size = Tokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab_size()
    if vocab_size is not None and vocab_size < tokenizer_size:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {tokenizer_size}")
    short_arch = {cls: name for name, (cls, _) in _ARCHES.items()}.get(arch, arch)
    if short_arch not in _ARCHES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_ARCHES)}")
    architecture, model_type = _ARCHES[short_arch]
    config = {"architectures": [architecture], "model_type": model_type,
              "vocab_size": vocab_size or tokenizer_size, "hidden_size": hidden_size,
              "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
              "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
              "max_position_embeddings": max_position_embeddings, **_BASE_CONFIG,
              "torch_dtype": dtype}
    config.update(_arch_flavour(short_arch, config))
    config.update(arch_overrides)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID],
                  "pad_token_id": PAD_ID}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _save_weights(out_dir, random_weights(config, seed), num_shards)
    return out_dir


def _install_tokenizer(out_dir: Path, tokenizer_dir: str | Path | None, max_len: int) -> None:
    if tokenizer_dir is None:
        train_tokenizer(out_dir, model_max_length=max_len)
        return
    shutil.copy(Path(tokenizer_dir) / "tokenizer.json", out_dir / "tokenizer.json")
    config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    config["model_max_length"] = max_len
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _save_weights(out_dir: Path, tensors: dict[str, Any], num_shards: int) -> None:
    from safetensors.torch import save_file

    if num_shards <= 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for i in range(num_shards):
        file_name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = {name: tensors[name] for name in names[i * per_shard:(i + 1) * per_shard]}
        save_file(shard, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def default_cache_dir() -> Path:
    """$TANDEM_CACHE, else ~/.cache/tandem (read at call time)."""
    return Path(os.environ.get("TANDEM_CACHE") or Path.home() / ".cache" / "tandem")


# The built-in model pair `tandem serve` runs with no --model: trained on the Python standard
# library by scripts/train_model_pair.py (docs/model-pair.md), shipped in the package.
BUILTIN_MODELS_DIR = Path(__file__).resolve().parents[1] / "builtin_models"
BUILTIN_MODEL_NAME = "tandem-stdlib-7m"
BUILTIN_DRAFT_NAME = "tandem-stdlib-draft-1m"
# It runs in float32 under --dtype auto: it is tiny, and float32 makes it token-exact with
# transformers on every device (the weights are stored in bfloat16 to keep the package small).
BUILTIN_MODEL_DTYPE = "float32"


def builtin_model_dir() -> Path:
    """The built-in target model (the default of `tandem serve`)."""
    return BUILTIN_MODELS_DIR / BUILTIN_MODEL_NAME


def builtin_draft_dir() -> Path:
    """The built-in draft model (the default --draft-model for the built-in target)."""
    return BUILTIN_MODELS_DIR / BUILTIN_DRAFT_NAME


def is_builtin_model(model_dir: str | Path) -> bool:
    return Path(model_dir).resolve().parent == BUILTIN_MODELS_DIR


def random_model_dir() -> Path:
    """Where build_random_model puts the random model under default_cache_dir()."""
    return default_cache_dir() / RANDOM_MODEL_NAME


def build_random_model(cache_dir: str | Path | None = None) -> Path:
    """A random model (Llama: hidden 256, 4 layers, 8 heads / 4 KV heads, vocab ~4096) for tests
    and CPU benchmarks, built once into cache_dir/tandem-tiny-llama and reused afterwards.

    Built in a temporary sibling directory and renamed into place, so a concurrent builder or
    a crash never leaves a half-written model behind. Returns the model directory.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / RANDOM_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("engine.model").info(
        "building the random model %s in %s (first use only; no download)", RANDOM_MODEL_NAME,
        cache_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{RANDOM_MODEL_NAME}-", dir=cache_dir))
    try:
        tokenizer_dir = train_tokenizer(staging / "tokenizer", vocab_size=4096)
        write_random_checkpoint(staging / "model", "llama", hidden_size=256, num_layers=4,
                                num_heads=8, num_kv_heads=4, intermediate_size=704,
                                max_position_embeddings=4096, tokenizer_dir=tokenizer_dir)
        try:
            os.rename(staging / "model", target)
        except OSError:
            if not (target / "config.json").is_file():  # not built by a concurrent builder
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
