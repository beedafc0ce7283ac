"""Grammar-constrained decoding with xgrammar (the tiers only: xgrammar imports torch).

xgrammar is what vLLM and SGLang use by default: grammars (JSON Schema, regex, EBNF,
structural tags) compile once into a token-level automaton, and a per-request matcher fills a
packed bitmask (one bit per vocabulary token) in microseconds.

    gateway: SamplingParams.structured_output (kind + spec text)
    tier, event loop:   GrammarCache.matcher(spec) in a worker thread (compile on a miss, LRU)
                        -> Request.grammar, before the request enters the scheduler
    tier, engine thread: mask_grammar_rows (engine/sampler.py, first of all processors) fills
                        the constrained rows' bitmask and sets the other tokens to -inf;
                        Scheduler.append_token advances the matcher with each accepted token

The prefill tier samples the first token under its own matcher; the decode tier's matcher
accepts that first token when the KV arrives (Scheduler.kv_arrived), then every later one.
Preemption recomputes KV but appends no token again, so the matcher is never advanced twice.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from typing import Sequence

import torch
import xgrammar as xgr

from engine.errors import InvalidRequestError
from engine.request import Request, TokenGrammar
from engine.sampling_params import STRUCTURED_ERROR_PREFIX, StructuredOutput
from engine.tokenizer import Tokenizer

# Compiled grammars kept (least recently used dropped first).
DEFAULT_CACHE_SIZE = 256
_VOCAB_TYPES = {"byte_level": xgr.VocabType.BYTE_LEVEL,
                "byte_fallback": xgr.VocabType.BYTE_FALLBACK, "raw": xgr.VocabType.RAW}


class InvalidStructuredOutput(InvalidRequestError):
    """The request's grammar does not compile (INVALID_ARGUMENT; the message starts with
    STRUCTURED_ERROR_PREFIX, and the gateway names the request field that carried it)."""

    def __init__(self, problem: str) -> None:
        super().__init__(STRUCTURED_ERROR_PREFIX + problem)


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int,
                   stop_token_ids: Sequence[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: every token's string in id order (special tokens
    empty, so no grammar can emit them; ids past the tokenizer up to the model's vocab_size are
    padding, never allowed), how those strings map to bytes, and the stop tokens (EOS) that end
    a completed grammar."""
    vocab, kind = tokenizer.grammar_vocab()
    special = set(tokenizer.all_special_ids)
    encoded = ["" if i in special else token for i, token in enumerate(vocab)]
    return xgr.TokenizerInfo(encoded, _VOCAB_TYPES[kind], vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids))


def _choice_grammar(choices: Sequence[str]) -> str:
    """EBNF accepting exactly one of `choices` (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCache:
    """Compiled grammars keyed by the spec, LRU, shared by the tier's requests. Thread-safe: the
    event loop calls `matcher` from worker threads; the tokenizer info and compiler are built on
    first use (a tier that never sees a constrained request never pays for them)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int],
                 capacity: int = DEFAULT_CACHE_SIZE) -> None:
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._stop_token_ids = tuple(stop_token_ids)
        self.capacity = capacity
        self._compiled: OrderedDict[StructuredOutput, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self.num_compiled = 0  # cache misses (compilations), for tests and logs

    def matcher(self, spec: StructuredOutput) -> xgr.GrammarMatcher:
        """A fresh matcher (at the grammar's start) for one request. Blocking on a miss: call it
        off the event loop. Raises InvalidStructuredOutput."""
        return xgr.GrammarMatcher(self.compiled(spec))

    def compiled(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        with self._lock:
            grammar = self._compiled.get(spec)
            if grammar is not None:
                self._compiled.move_to_end(spec)
                return grammar
            compiler = self._get_compiler()
        grammar = _compile(compiler, spec)  # outside the lock: other specs compile meanwhile
        with self._lock:
            self.num_compiled += 1
            self._compiled[spec] = grammar
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return grammar

    def __len__(self) -> int:
        return len(self._compiled)

    def _get_compiler(self) -> xgr.GrammarCompiler:
        if self._compiler is None:
            info = tokenizer_info(self._tokenizer, self._vocab_size, self._stop_token_ids)
            # our LRU is the cache; xgrammar's own would keep every grammar forever
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        return self._compiler


async def grammar_for(cache: GrammarCache | None,
                      spec: StructuredOutput | None) -> TokenGrammar | None:
    """The matcher a new request with `spec` starts with (None: unconstrained), compiled in a
    worker thread so the event loop and the engine thread never wait for a compilation.
    Raises InvalidStructuredOutput (also when this instance has no cache)."""
    if spec is None:
        return None
    if cache is None:
        raise InvalidStructuredOutput("this instance does not support structured output")
    return await asyncio.to_thread(cache.matcher, spec)


def _compile(compiler: xgr.GrammarCompiler, spec: StructuredOutput) -> xgr.CompiledGrammar:
    """Compiles one spec. JSON is compact (no free whitespace: a model could otherwise emit
    spaces forever) and strict (no properties a schema does not name)."""
    try:
        if spec.kind == "json_schema":
            schema = _printable_strings(json.loads(spec.spec))
            return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        if spec.kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                strict_mode=False)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.spec)
        if spec.kind == "choice":
            return compiler.compile_grammar(_choice_grammar(spec.choices))
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.spec)
        if spec.kind == "structural_tag":
            return compiler.compile_structural_tag(json.dumps(_printable_strings(
                json.loads(spec.spec))))
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError, ValueError, its own
        raise InvalidStructuredOutput(f"the {spec.kind} does not compile: {_reason(e)}") from e
    raise InvalidStructuredOutput(f"unknown structured output kind {spec.kind!r}")


# A JSON string's characters without escapes: no quote, backslash or control character.
_PLAIN_CHARS = '[^"\\\\\\x00-\\x1f]'
_PATTERN_KEYS = ("pattern", "format", "enum", "const")


def _printable_strings(schema: object) -> object:
    """The schema with every string that has minLength / maxLength (and no pattern, format,
    enum or const) given the same bounds as a pattern of plain characters instead.

    xgrammar 0.2 compiles a bounded string to `[^"\\\r\n]{min,max}`, which lets control
    characters through raw: invalid JSON that json.loads refuses. A pattern is compiled as a
    JSON string with the right character class."""
    if isinstance(schema, list):
        return [_printable_strings(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _printable_strings(value) for key, value in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if (out.get("type") == "string" and bounded
            and not any(key in out for key in _PATTERN_KEYS)):
        low, high = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = f"^{_PLAIN_CHARS}{{{low},{'' if high is None else int(high)}}}$"
    return out


def _reason(error: Exception) -> str:
    """xgrammar's message without its log prefix ("[time] /project/cpp/file.cc:83: ")."""
    return _LOG_PREFIX.sub("", str(error).strip()) or type(error).__name__


_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def grammar_rows(requests: Sequence[Request]) -> list[int]:
    """Rows of requests decoding under a grammar."""
    return [row for row, request in enumerate(requests) if request.grammar is not None]


def mask_grammar_rows(logits: torch.Tensor, requests: Sequence[Request],
                      rows: list[int]) -> torch.Tensor:
    """The logits ([N, vocab] float32) with every token the grammar of `rows`' requests does
    not allow next set to -inf: a new tensor (the input, the raw logits of logprobs, is left as
    it was); other rows unchanged. One [N, ceil(vocab / 32)] int32 bitmask is filled on the
    host (its unconstrained rows stay all-ones) and goes to the logits' device."""
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for row in rows:
        requests[row].grammar.fill_next_token_bitmask(bitmask, row)
    masked = logits.clone()
    xgr.apply_token_bitmask_inplace(masked, bitmask.to(logits.device), indices=rows)
    return masked
