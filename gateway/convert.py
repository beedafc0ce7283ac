"""Pure conversions: OpenAI requests -> (prompt ids, SamplingParams), tier responses -> OpenAI
JSON, and SSE framing. Every validation failure raises ApiError (400 / INVALID_ARGUMENT,
404 / NOT_FOUND for an unknown model) before anything is sent to a tier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import grpc

from engine.sampling_params import MAX_LOGPROBS, InvalidSamplingParam, SamplingParams
from engine.tokenizer import Tokenizer
from gateway.errors import ApiError, invalid
from gateway.protocol import ChatCompletionRequest, ChatMessage, SamplingRequest, TokenizeRequest
from gateway.structured import Structured, check_pb
from protos.tandem.v1 import common_pb2, generation_pb2, instance_pb2

SSE_DONE = "data: [DONE]\n\n"
SSE_PING = ": ping\n\n"
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
           common_pb2.FINISH_REASON_ABORT: "abort"}
_UINT64 = 1 << 64


@dataclass(frozen=True)
class ModelSpec:
    """The served model, as every instance reported it at start-up."""

    name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    architecture: str

    @classmethod
    def from_pb(cls, info: instance_pb2.InstanceInfo, name: str | None = None) -> ModelSpec:
        return cls(name or info.model_name, info.max_model_len, info.vocab_size,
                   tuple(info.eos_token_ids), info.architecture)

    def to_pb(self) -> generation_pb2.ModelInfo:
        return generation_pb2.ModelInfo(name=self.name, max_model_len=self.max_model_len,
                                        vocab_size=self.vocab_size,
                                        eos_token_ids=self.eos_token_ids,
                                        architecture=self.architecture)


# requests
def check_model(requested: str | None, spec: ModelSpec) -> None:
    """An empty / missing model means the served one; any other name is a 404."""
    if requested and requested != spec.name:
        raise ApiError(grpc.StatusCode.NOT_FOUND, f"The model `{requested}` does not exist; "
                          f"this server serves `{spec.name}`.", "model", "model_not_found")


# Parameters Tandem cannot honour yet, each with the values that change nothing (accepted, as
# is leaving it out). Values match by type too.
_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "suffix": ("",), "functions": ([],), "function_call": ("none",),
}
# Chat roles a template is written for; any other is refused rather than passed through.
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _is_no_op(value: Any, allowed: tuple[Any, ...]) -> bool:
    return value is None or any(type(value) is type(a) and value == a for a in allowed)


def check_supported(req: SamplingRequest) -> None:
    """Rejects a parameter Tandem cannot honour yet (400 naming it, code unsupported_parameter)
    instead of silently ignoring it; left out or at a no-op value (`_NO_OP_VALUES`) it passes."""
    for param, allowed in _NO_OP_VALUES.items():
        if not _is_no_op(getattr(req, param, None), allowed):
            accepted = " or ".join(json.dumps(a) for a in allowed)
            raise invalid(f"{param} is not supported yet"
                          + (f" (only {accepted}, or leave it out)" if accepted else ""),
                          param, "unsupported_parameter")
    if isinstance(req, ChatCompletionRequest) and req.echo:
        raise invalid("echo is not supported yet on chat completions (only false, or leave it "
                      "out); /v1/completions supports it", "echo", "unsupported_parameter")


def check_stream_options(req: SamplingRequest) -> None:
    """stream_options only with stream: true (as vLLM and OpenAI)."""
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options can only be set when stream is true", "stream_options")


def check_token_ids(ids: Sequence[int], spec: ModelSpec, param: str) -> list[int]:
    """Every id in [0, vocab_size)."""
    bad = next((i for i in ids if not 0 <= i < spec.vocab_size), None)
    if bad is not None:
        raise invalid(f"token id {bad} is out of range [0, {spec.vocab_size})", param)
    return list(ids)


def check_prompt_ids(ids: Sequence[int], spec: ModelSpec, param: str = "prompt") -> list[int]:
    """Non-empty, every id in [0, vocab_size)."""
    if not ids:
        raise invalid("the prompt is empty", param)
    return check_token_ids(ids, spec, param)


# Most choices one request may ask for: n, best_of, and (a batch) prompts x best_of.
MAX_N = 16
MAX_BATCH_CHOICES = 256


def num_choices(req: SamplingRequest, num_prompts: int = 1) -> tuple[int, int]:
    """(n, best_of) of a request, checked (400s naming the field): n in [1, MAX_N]; best_of
    (completions) in [n, MAX_N], and not streamed when above n (as OpenAI: the best are
    known only at the end); at most MAX_BATCH_CHOICES branches over a batch of prompts."""
    n = 1 if req.n is None else req.n
    if isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise invalid(f"n must be an integer in [1, {MAX_N}], got {n}", "n")
    best_of = getattr(req, "best_of", None)
    best_of = n if best_of is None else best_of
    if isinstance(best_of, bool) or not n <= best_of <= MAX_N:
        raise invalid(f"best_of must be an integer in [n={n}, {MAX_N}], got {best_of}", "best_of")
    if best_of > n and req.stream:
        raise invalid("best_of > n cannot be streamed: the best branches are known only when "
                      "all have finished", "best_of")
    if num_prompts * best_of > MAX_BATCH_CHOICES:
        raise invalid(f"{num_prompts} prompts x {best_of} branches exceed the "
                      f"{MAX_BATCH_CHOICES} a request may ask for", "prompt")
    return n, best_of


def check_choices_pb(n: int, best_of: int) -> tuple[int, int]:
    """(n, best_of) of a gRPC GenerateRequest (0 means the default: 1, n), checked as
    `num_choices` (the stream carries best_of's pick at its end)."""
    n = n or 1
    best_of = best_of or n
    if not 1 <= n <= MAX_N:
        raise invalid(f"n must be in [1, {MAX_N}], got {n}", "n")
    if not n <= best_of <= MAX_N:
        raise invalid(f"best_of must be in [n={n}, {MAX_N}], got {best_of}", "best_of")
    return n, best_of


def completion_prompts(prompt: Any) -> list[str | list[int]]:
    """A completions `prompt` as a batch: a list of texts or token-id lists (a single text or
    token-id list is a batch of one)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return list(prompt)
    return [prompt]


def completion_prompt_ids(prompt: str | list[int], tokenizer: Tokenizer | None, spec: ModelSpec,
                          param: str = "prompt") -> list[int]:
    """One completions prompt as token ids (text gets the tokenizer's special tokens, e.g.
    BOS); `param` names it in errors (`prompt.1` for a batch's second)."""
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("the prompt is empty", param)
        if tokenizer is None:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the tokenizer is not loaded yet")
        return check_prompt_ids(tokenizer.encode(prompt), spec, param)
    return check_prompt_ids(prompt, spec, param)


def echo_only(req: SamplingRequest) -> bool:
    """A completions request that scores its prompt without generating: echo with max_tokens
    0 (OpenAI's and vLLM's rule). The tiers generate one token, which the answer leaves out."""
    return bool(getattr(req, "echo", False)) and req.max_new_tokens() == 0


def echo_text(prompt: Any, ids: Sequence[int], tokenizer: Tokenizer) -> str:
    """The prompt as echo returns it: a text prompt as given, token ids decoded (special
    tokens kept, as vLLM)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(ids, skip_special_tokens=False)


def chat_messages(chat: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for the chat template: text content parts joined; other parts and roles other
    than CHAT_ROLES rejected (400 naming the message's field)."""
    messages = []
    for i, message in enumerate(chat):
        if message.role not in CHAT_ROLES:
            raise invalid(f"unknown role {message.role!r}; expected one of "
                          f"{', '.join(sorted(CHAT_ROLES))}", f"messages.{i}.role")
        data = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            kinds = {part.get("type") for part in message.content}
            if kinds - {"text"}:
                raise invalid(f"content parts {sorted(map(str, kinds - {'text'}))} are not "
                              "supported (text only)", f"messages.{i}.content")
            data["content"] = "".join(str(part.get("text", "")) for part in message.content)
        messages.append(data)
    return messages


def tokenize_ids(req: TokenizeRequest, tokenizer: Tokenizer) -> list[int]:
    """/tokenize's ids: of `messages` rendered by the chat template (special tokens added only
    with add_special_tokens: true), else of `prompt` (added unless add_special_tokens: false).
    Raises TokenizerError when the template cannot be rendered."""
    if req.messages is not None:
        text = tokenizer.apply_chat_template(chat_messages(req.messages),
                                             req.add_generation_prompt)
        return tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
    if req.prompt is None:
        raise invalid("a prompt or messages are required", "prompt")
    return tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)


# sampling
def _check_params(sp: common_pb2.SamplingParams, prompt_len: int, prefix: str = "") -> None:
    """The ranges of every field, as the tiers check them (engine.sampling_params): a 400
    naming the field (`prefix` + its name)."""
    try:
        SamplingParams.from_pb(sp).check_prompt_logprobs(prompt_len)
    except InvalidSamplingParam as e:
        raise invalid(str(e), prefix + e.param) from e


def _logit_bias(bias: dict[str, float], spec: ModelSpec) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as strings) keyed by int, every id in the vocabulary."""
    try:
        by_id = {int(key): value for key, value in bias.items()}
    except ValueError as e:
        raise invalid(f"logit_bias keys must be token ids: {e}", "logit_bias") from e
    check_token_ids(list(by_id), spec, "logit_bias")
    return by_id


def _check_lengths(max_tokens: int, prompt_len: int, spec: ModelSpec, param: str) -> None:
    if max_tokens < 1:
        raise invalid(f"{param} must be at least 1, got {max_tokens}", param)
    if prompt_len + max_tokens > spec.max_model_len:
        raise invalid(f"This model's maximum context length is {spec.max_model_len} tokens. "
                      f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} in "
                      f"the prompt, {max_tokens} for the completion).", param,
                      "context_length_exceeded")


def _check_min_tokens(min_tokens: int, max_tokens: int, param: str) -> None:
    if not 0 <= min_tokens <= max_tokens:
        raise invalid(f"{param} must be in [0, max_tokens={max_tokens}], got {min_tokens}", param)


def sampling_from_request(req: SamplingRequest, prompt_len: int, spec: ModelSpec,
                          structured: Structured | None = None) -> common_pb2.SamplingParams:
    """SamplingParams for an OpenAI request; max_tokens omitted fills the context; `structured`:
    the grammar the output must follow (gateway.structured)."""
    if prompt_len >= spec.max_model_len:
        _check_lengths(1, prompt_len, spec, "messages" if hasattr(req, "messages") else "prompt")
    max_tokens = 1 if echo_only(req) else req.max_new_tokens()
    if max_tokens is None:
        max_tokens = spec.max_model_len - prompt_len
    _check_lengths(max_tokens, prompt_len, spec, req.max_tokens_param)
    _check_min_tokens(req.min_tokens or 0, max_tokens, "min_tokens")
    stop_ids = check_token_ids(req.stop_token_ids or [], spec, "stop_token_ids")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sp = common_pb2.SamplingParams(max_tokens=max_tokens, stop=[s for s in stop if s],
                                   stop_token_ids=stop_ids, ignore_eos=req.ignore_eos,
                                   logit_bias=_logit_bias(req.logit_bias or {}, spec))
    if req.min_tokens:
        sp.min_tokens = req.min_tokens
    if not req.skip_special_tokens:
        sp.skip_special_tokens = False
    sp.include_stop_str_in_output = req.include_stop_str_in_output
    for name in _OPTIONAL_FLOATS:
        if getattr(req, name) is not None:
            setattr(sp, name, getattr(req, name))
    if req.top_k is not None and req.top_k > 0:
        sp.top_k = req.top_k
    if req.seed is not None:
        sp.seed = req.seed % _UINT64
    num_logprobs = _num_logprobs(req)
    if num_logprobs is not None:
        sp.logprobs = num_logprobs
    elif (choices := num_choices(req))[1] > choices[0]:
        sp.logprobs = 0  # best_of ranks the branches by their tokens' logprobs
    num_prompt_logprobs = _num_prompt_logprobs(req, num_logprobs)
    if num_prompt_logprobs is not None:
        sp.prompt_logprobs = num_prompt_logprobs
    if structured is not None:
        sp.structured_output.CopyFrom(structured.output)
    _check_params(sp, prompt_len)
    return sp


def _num_prompt_logprobs(req: SamplingRequest, num_logprobs: int | None) -> int | None:
    """SamplingParams.prompt_logprobs for a request: vLLM's `prompt_logprobs`, and for
    completions with echo the `logprobs` count (the larger of the two when both are set: each part of the
    answer is cut to its own). None: none."""
    num = getattr(req, "prompt_logprobs", None)
    if num is not None and (isinstance(num, bool) or not 0 <= num <= MAX_LOGPROBS):
        raise invalid(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {num}",
                      "prompt_logprobs")
    if getattr(req, "echo", False) and num_logprobs is not None:
        return max(num_logprobs, num or 0)
    return num


def wants_logprobs(req: SamplingRequest) -> bool:
    """Whether the client asked for logprobs (best_of may ask the tiers without it)."""
    return _num_logprobs(req) is not None


def _num_logprobs(req: SamplingRequest) -> int | None:
    """SamplingParams.logprobs for a request: completions' `logprobs: N`; chat's `top_logprobs`
    (0 when left out) with `logprobs: true`. None: no logprobs. 400s, as OpenAI: a count
    outside [0, 20] (naming it), chat's top_logprobs without logprobs: true."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise invalid("top_logprobs can only be set when logprobs is true", "top_logprobs")
        if not req.logprobs:
            return None
        num, param = req.top_logprobs or 0, "top_logprobs"
    else:
        num, param = getattr(req, "logprobs", None), "logprobs"
        if num is None:
            return None
    if isinstance(num, bool) or not 0 <= num <= MAX_LOGPROBS:
        raise invalid(f"{param} must be an integer in [0, {MAX_LOGPROBS}], got {num}", param)
    return num


# Request fields copied as they are into the SamplingParams message's optional floats.
_OPTIONAL_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "min_p")


def check_sampling_pb(sp: common_pb2.SamplingParams, prompt_len: int,
                      spec: ModelSpec) -> common_pb2.SamplingParams:
    """Validates a gRPC SamplingParams (max_tokens required); returns a cleaned copy."""
    if sp.max_tokens == 0:
        raise invalid("sampling.max_tokens is required (>= 1)", "sampling.max_tokens")
    _check_lengths(sp.max_tokens, prompt_len, spec, "sampling.max_tokens")
    check_token_ids(sp.stop_token_ids, spec, "sampling.stop_token_ids")
    clean = common_pb2.SamplingParams()
    clean.CopyFrom(sp)
    clean.ClearField("stop")
    clean.stop.extend(s for s in sp.stop if s)
    _check_params(clean, prompt_len, "sampling.")
    check_token_ids(list(sp.logit_bias), spec, "sampling.logit_bias")
    check_pb(sp.structured_output, "sampling.structured_output")
    return clean


# responses
def finish_reason(value: int) -> str | None:
    return _FINISH.get(value)


def usage_dict(usage: common_pb2.Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens}}


def usage_so_far(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    """The usage on a streamed chunk with continuous_usage_stats (vLLM's shape)."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def timings_dict(timings: common_pb2.PhaseTimings, **extra: float) -> dict[str, Any]:
    """Every PhaseTimings field (zeros included), plus gateway-side measurements."""
    return {**{f.name: getattr(timings, f.name) for f in timings.DESCRIPTOR.fields}, **extra}


def _envelope(kind: str, request_id: str, model: str, created: int,
              choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": created, "model": model,
            "choices": choices}


def completion_body(request_id: str, model: str, created: int, text: str | None,
                    finish: str | None, logprobs: dict[str, Any] | None = None,
                    index: int = 0) -> dict[str, Any]:
    """A text_completion response or stream chunk (same shape, one choice, `index`);
    `logprobs` from `completion_logprobs`."""
    choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    return _envelope("text_completion", request_id, model, created, [choice])


def chat_body(request_id: str, model: str, created: int, text: str | None,
              finish: str | None, stream: bool = False, first: bool = False,
              logprobs: dict[str, Any] | None = None, index: int = 0,
              tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A chat.completion response, or a chat.completion.chunk (`first` carries the role), of
    one choice, `index`; `logprobs` from `chat_logprobs`; `tool_calls` (gateway.tools) when the
    request's tools are parsed: the message then has them and its content is null when
    empty."""
    if not stream:
        message: dict[str, Any] = {"role": "assistant", "content": text or ""}
        if tool_calls is not None:
            message.update(content=text or None, tool_calls=tool_calls)
        choice = {"index": index, "message": message, "logprobs": logprobs,
                  "finish_reason": finish}
        return _envelope("chat.completion", request_id, model, created, [choice])
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if text or first:
        delta["content"] = text or ""
    if tool_calls:
        delta["tool_calls"] = tool_calls
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return _envelope("chat.completion.chunk", request_id, model, created, [choice])


# logprobs
# JSON has no -inf: a logprob below this is reported as it (vLLM's value).
MIN_LOGPROB = -9999.0


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's text as the logprobs show it: the token decoded alone, special tokens kept (as
    vLLM; a token holding part of a UTF-8 character decodes to U+FFFD)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(entries: Sequence[common_pb2.TokenLogprobs], tokenizer: Tokenizer,
                        text_offset: int = 0, num_top: int | None = None) -> dict[str, Any]:
    """OpenAI's completions `logprobs` for these tokens: tokens, token_logprobs, top_logprobs
    (one dict text -> logprob per token: the top entries, at most num_top of them (None: all),
    and the chosen token, as OpenAI's "up to logprobs + 1") and text_offset (from
    `text_offset`, the length of the tokens' text before these, as vLLM)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}
    for entry in entries:
        text = token_text(tokenizer, entry.token_id)
        top = {token_text(tokenizer, t): _logprob(v)
               for t, v in zip(entry.top_token_ids[:num_top], entry.top_logprobs[:num_top])}
        top.setdefault(text, _logprob(entry.logprob))
        out["tokens"].append(text)
        out["token_logprobs"].append(_logprob(entry.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out


def echo_logprobs(first_token_id: int, entries: Sequence[common_pb2.TokenLogprobs],
                  tokenizer: Tokenizer, num_top: int) -> dict[str, Any]:
    """The prompt's part of completions `logprobs` with echo (OpenAI's legacy shape, as vLLM):
    the first prompt token with a null logprob and null top_logprobs, then each later prompt
    token's (`entries`), text_offset counted from the first token's text."""
    first = token_text(tokenizer, first_token_id)
    out = completion_logprobs(entries, tokenizer, len(first), num_top)
    for key, value in (("tokens", first), ("token_logprobs", None), ("top_logprobs", None),
                       ("text_offset", 0)):
        out[key].insert(0, value)
    return out


def joined_logprobs(*parts: dict[str, Any]) -> dict[str, Any]:
    """Completions `logprobs` objects one after the other (each list concatenated)."""
    return {key: [v for part in parts for v in part[key]] for key in parts[0]}


def vllm_prompt_logprobs(entries: Sequence[common_pb2.TokenLogprobs], tokenizer: Tokenizer,
                         num_top: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `choices[].prompt_logprobs`: null for the first prompt token, then per token a
    dict token id -> {logprob, rank, decoded_token} of the num_top most likely tokens and the
    prompt's own (rank: 1 for the most likely; null for the prompt's token when it is not
    among them)."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for entry in entries:
        ranked = {t: (v, rank) for rank, (t, v) in
                  enumerate(zip(entry.top_token_ids[:num_top], entry.top_logprobs[:num_top]), 1)}
        ranked.setdefault(entry.token_id, (entry.logprob, None))
        out.append({str(t): {"logprob": _logprob(v), "rank": rank,
                             "decoded_token": token_text(tokenizer, t)}
                    for t, (v, rank) in ranked.items()})
    return out


def _chat_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[common_pb2.TokenLogprobs],
                  tokenizer: Tokenizer) -> dict[str, Any]:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [{token,
    logprob, bytes}]}]}, top_logprobs most likely first."""
    return {"content": [
        {**_chat_entry(tokenizer, entry.token_id, entry.logprob),
         "top_logprobs": [_chat_entry(tokenizer, t, v)
                          for t, v in zip(entry.top_token_ids, entry.top_logprobs)]}
        for entry in entries]}


def usage_chunk(kind: str, request_id: str, model: str, created: int,
                usage: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of stream_options.include_usage: no choices, the usage."""
    return {**_envelope(kind, request_id, model, created, []), "usage": usage}


def sse_event(obj: dict[str, Any]) -> str:
    """One SSE frame: `data: {json}` and a blank line."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
