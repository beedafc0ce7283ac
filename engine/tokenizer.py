"""A model's tokenizer and chat template, loaded from its files with `tokenizers` and jinja2.

Torch-free and transformers-free: the gateway and both tiers import it. Results match Hugging Face
`AutoTokenizer` for tokenizers backed by a `tokenizer.json`:

- `encode(text)` == `AutoTokenizer(...)(text).input_ids` (special tokens added by the
  post-processor, e.g. a BOS);
- `decode(ids)` == `AutoTokenizer.decode(ids, skip_special_tokens=True)`;
- `apply_chat_template(messages)` == `AutoTokenizer.apply_chat_template(messages, tokenize=False)`;
  chat prompts are then encoded with `encode(text, add_special_tokens=False)`, as HF does.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import processors

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# The files a gateway needs from an instance to build a Tokenizer.
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, GENERATION_CONFIG_FILE,
                   *CHAT_TEMPLATE_FILES)
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
_GENERIC_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")
# Cleanup HF applies on decode when `clean_up_tokenization_spaces` is set (never for BPE models).
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerError(ValueError):
    """The tokenizer files are missing or malformed, or a chat template cannot be rendered."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from e


def _token_text(value: Any) -> str | None:
    """A special token from a config: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    """Compiles like HF: sandboxed, trim_blocks, lstrip_blocks, loop controls, HF's globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _pick_template(template: Any) -> str | None:
    """A chat_template value: a string, or a list of {"name", "template"} (take "default")."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) else None


def _apply_bos_eos_flags(backend: _HFTokenizer, config: Mapping[str, Any],
                         special_tokens: Mapping[str, str]) -> None:
    """Like HF's model-specific tokenizer classes (LlamaTokenizer, ...): explicit add_bos_token /
    add_eos_token flags replace the post-processor. The generic class keeps tokenizer.json's."""
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    if config.get("tokenizer_class") in _GENERIC_CLASSES:
        return

    def known(flag: str, name: str) -> str | None:
        token = special_tokens.get(name) if config.get(flag) else None
        return token if token and backend.token_to_id(token) is not None else None

    bos, eos = known("add_bos_token", "bos_token"), known("add_eos_token", "eos_token")
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    tokens = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=tokens)


def _load_template(path: Path, config: Mapping[str, Any]) -> str | None:
    """The chat template: chat_template.jinja, then chat_template.json, then tokenizer_config."""
    jinja_file = path / CHAT_TEMPLATE_FILES[0]
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    from_json = _read_json(path / CHAT_TEMPLATE_FILES[1]).get("chat_template")
    return _pick_template(from_json) or _pick_template(config.get("chat_template"))


class Tokenizer:
    """Encode/decode and chat templating for one model; immutable and thread-safe after loading."""

    def __init__(self, backend: _HFTokenizer, config: Mapping[str, Any],
                 special_tokens: Mapping[str, str], chat_template: str | None,
                 generation_eos_ids: Sequence[int] = ()) -> None:
        self._backend = backend
        self._special_tokens = dict(special_tokens)
        self._chat_template_source = chat_template
        self._generation_eos_ids = tuple(generation_eos_ids)
        is_bpe = type(backend.model).__name__ == "BPE"
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and not is_bpe

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Loads tokenizer.json (required), tokenizer_config.json, special_tokens_map.json,
        generation_config.json and a chat template file when present."""
        path = Path(path)
        if not (path / TOKENIZER_FILE).is_file():
            raise TokenizerError(f"{path}: no {TOKENIZER_FILE} (only fast tokenizers "
                                 "supported; a model directory without one needs --tokenizer DIR)")
        try:
            backend = _HFTokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as e:  # the Rust loader raises plain Exceptions
            raise TokenizerError(f"{path / TOKENIZER_FILE}: cannot load ({e})") from e
        config = _read_json(path / CONFIG_FILE)
        # like HF: special_tokens_map.json wins only in legacy configs (no added_tokens_decoder)
        token_map = _read_json(path / SPECIAL_TOKENS_FILE)
        legacy = "added_tokens_decoder" not in config
        special = {**config, **token_map} if legacy else {**token_map, **config}
        special_tokens = {k: t for k in _NAMED_SPECIAL if (t := _token_text(special.get(k)))}
        _apply_bos_eos_flags(backend, config, special_tokens)
        eos = _read_json(path / GENERATION_CONFIG_FILE).get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else [i for i in eos or () if isinstance(i, int)]
        return cls(backend, config, special_tokens, _load_template(path, config), eos_ids)

    # encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens the post-processor adds e.g. a BOS."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def surely_longer_than(self, text: str, limit: int) -> int | None:
        """A count of tokens that `encode(text)` surely exceeds `limit` with, found without
        encoding all of a long text (a prompt far over the context is refused cheaply); None
        when that is not sure (encode it to know).

        Two lower bounds. (1) Where every token stands for at most `max_token_chars`
        characters (BPE that never fuses unknown characters into one token), a text has at
        least len / max_token_chars tokens (halved: a normalizer may contract a few
        characters). (2) Pre-tokenizers split at spaces and models tokenize each piece on its
        own, so the text up to a space has no more tokens than the whole: encoding a prefix of
        16 characters per allowed token bounds the whole from below."""
        if self._tokens_span_few_chars and len(text) // (2 * self.max_token_chars) > limit:
            return len(text) // (2 * self.max_token_chars)
        budget = 16 * (limit + 1)  # characters: far more than `limit` tokens usually take
        if len(text) <= 2 * budget:
            return None  # short enough to encode whole
        cut = text.rfind(" ", 0, budget)
        if cut <= 0:
            return None
        count = len(self.encode(text[:cut], add_special_tokens=False))
        return count if count > limit else None

    @cached_property
    def adds_special_tokens(self) -> bool:
        """Whether `encode(text)` adds special tokens (e.g. a BOS) to what the text spells."""
        return self.encode("a") != self.encode("a", add_special_tokens=False)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters one token of the vocabulary (added tokens included) spells."""
        return max(len(token) for token in self._backend.get_vocab(with_added_tokens=True))

    @cached_property
    def _tokens_span_few_chars(self) -> bool:
        """Whether no token covers more text than its vocabulary string: BPE whose unknown
        characters fall back to bytes, or are not fused into one unknown token."""
        model = self._backend.model
        return type(model).__name__ == "BPE" and (
            model.byte_fallback or not model.fuse_unk or model.unk_token is None)

    def grammar_vocab(self) -> tuple[list[str], str]:
        """Every token's vocabulary string in id order (added tokens included; an id without a
        token is ""), and how those strings spell bytes: "byte_level" (GPT-2 style byte-level
        BPE: the ByteLevel decoder), "byte_fallback" (SentencePiece style: "▁" is a space and
        <0xXX> tokens are bytes) or "raw" (the strings are the text). For grammar matchers."""
        strings = [self._backend.id_to_token(i) or "" for i in range(self.vocab_size)]
        decoder = json.loads(self._backend.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        if "ByteLevel" in kinds:
            return strings, "byte_level"
        if "ByteFallback" in kinds or getattr(self._backend.model, "byte_fallback", False):
            return strings, "byte_fallback"
        return strings, "raw"

    def id_to_token(self, ids: Sequence[int]) -> list[str | None]:
        """The vocabulary's string of each id (e.g. "Ġworld", "▁the", "<0xE4>"), as HF's
        convert_ids_to_tokens; None for an id outside the vocabulary."""
        return [self._backend.id_to_token(i) for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` as HF decodes it (invalid UTF-8 bytes become U+FFFD)."""
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._cleanup:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text

    # chat
    @property
    def has_chat_template(self) -> bool:
        return self._chat_template_source is not None

    @cached_property
    def _chat_template(self) -> jinja2.Template:
        if self._chat_template_source is None:
            raise TokenizerError("this model's tokenizer has no chat template; "
                                 "use the completions API or a model with a chat_template")
        try:
            return _compile_template(self._chat_template_source)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"the model's chat template does not compile: {e}") from e

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Renders the chat template like HF (tokenize=False); `kwargs` become template variables
        (e.g. `tools`, a list of OpenAI tool dicts, as HF's apply_chat_template passes them).
        Message keys whose value is None are dropped. Raises TokenizerError when there is no
        template or it raises an exception."""
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self._special_tokens, **kwargs}
        try:
            return self._chat_template.render(messages=chat,
                                              add_generation_prompt=add_generation_prompt,
                                              **variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template error: {e}") from e

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Prompt ids of a chat: the rendered template (`kwargs` as in apply_chat_template),
        encoded without added special tokens."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        **kwargs)
        return self.encode(text, add_special_tokens=False)

    # ids
    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def _named_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """The tokenizer's EOS id, then any other EOS ids of generation_config.json."""
        first = [] if self.eos_token_id is None else [self.eos_token_id]
        return first + [i for i in self._generation_eos_ids if i not in first]

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary, added tokens included (HF's len(tokenizer))."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens (bos, eos, ...) and of every added special token."""
        named = {self._backend.token_to_id(t) for t in self._special_tokens.values()}
        added = {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
        return sorted(i for i in named | added if i is not None)
