"""OpenAI request bodies for /v1/completions and /v1/chat/completions, and vLLM's /tokenize and
/detokenize.

Unknown fields are ignored (never a 422). Fields are parsed leniently here; what Tandem does not
support yet (n > 1, echo on chat, functions) is declared so that
`gateway.convert` can reject it with a 400 naming it ("not supported yet") instead of silently
ignoring it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# A prompt: text, a batch of texts (one for now), token ids, or a batch of token id lists.
Prompt = str | list[int] | list[str] | list[list[int]]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Lenient):
    # Send one last chunk with `choices: []` and the request's usage.
    include_usage: bool = False
    # Extra (vLLM): every chunk carries the usage so far (enough on its own here; vLLM also
    # needs include_usage).
    continuous_usage_stats: bool = False


class SamplingRequest(_Lenient):
    """Fields shared by completions and chat completions."""

    # Served model name; None means the only model served.
    model: str | None = None
    # Most tokens to generate; None means up to the context length.
    max_tokens: int | None = None
    # Newer name of max_tokens; wins over max_tokens when both are given (as OpenAI and vLLM).
    max_completion_tokens: int | None = None
    # Extra (vLLM): tokens generated before EOS, stop_token_ids or stop strings can end it.
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    # OpenAI: in [-2, 2], over the output tokens so far (once / per occurrence).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Token id (as a string) -> bias in [-100, 100] added to its logit; at most 300.
    logit_bias: dict[str, float] | None = None
    # Extra (vLLM) sampling fields; top_k <= 0 means off; min_p in [0, 1]; repetition_penalty
    # > 0 over prompt and output tokens (1 is off).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # Structured output (gateway/structured.py): {"type": "text" | "json_object" |
    # "json_schema", "json_schema": {"name", "schema", "strict"}}.
    response_format: dict[str, Any] | None = None
    # Extra (vLLM) structured output, at most one of these and response_format: a JSON Schema
    # (object or JSON text), a regex, a list of choices, an EBNF grammar.
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    seed: int | None = None
    # One string or a list; excluded from the returned text.
    stop: str | list[str] | None = None
    # Extra: token ids that end generation, and generating past EOS.
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # Extra (vLLM), output text only: false keeps special tokens' text (e.g. <|im_end|>); true
    # ends the text with the stop string matched (and a stop token's text, when not skipped).
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @property
    def max_tokens_param(self) -> str:
        """The field that sets the completion's length: max_completion_tokens when given."""
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def max_new_tokens(self) -> int | None:
        """max_completion_tokens, else max_tokens, else None (fill the context)."""
        return getattr(self, self.max_tokens_param)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    # Log probabilities of each generated token and of the `logprobs` most likely ones, 0..20
    # (0: the chosen token's only).
    logprobs: int | None = None
    # Return the prompt's text before the completion's (and, with logprobs, the prompt tokens'
    # logprobs first); with max_tokens 0, the prompt alone (scoring it, as vLLM).
    echo: bool = False
    # Extra (vLLM): every prompt token's logprob after the first and the `prompt_logprobs` most
    # likely tokens' at each position, 0..20, in `choices[].prompt_logprobs`.
    prompt_logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Lenient):
    """A chat message. Extra keys (name, tool_calls, ...) are kept for the chat template."""

    model_config = ConfigDict(extra="allow")

    role: str
    # Text, or content parts [{"type": "text", "text": ...}].
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # Each generated token's log probability, and (top_logprobs, 0..20, needs logprobs: true)
    # the most likely tokens' at each position.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Extra (vLLM): echo the last message; not supported yet (a 400 when true).
    echo: bool = False
    # Extra (vLLM): every prompt token's logprob after the first and the `prompt_logprobs` most
    # likely tokens' at each position, 0..20, in the response's top-level `prompt_logprobs`.
    prompt_logprobs: int | None = None
    # Extra (vLLM): render the assistant header after the last message (default True).
    add_generation_prompt: bool = True
    # Tool calling (gateway/tools.py): function tools, rendered by the chat template; the
    # output is parsed into tool_calls (Hermes format). functions / function_call (the older
    # API) are not supported: a 400 unless empty / "none".
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


class TokenizeRequest(_Lenient):
    """POST /tokenize (vLLM's shape): a `prompt`, or chat `messages` rendered by the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # Add the tokenizer's special tokens (e.g. BOS); default True for a prompt, False for
    # messages (the template writes them), as vLLM.
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    # Answer the token strings too: not supported yet (a 400 when true).
    return_token_strs: bool = False


class DetokenizeRequest(_Lenient):
    """POST /detokenize (vLLM's shape): token ids -> text, special tokens kept."""

    model: str | None = None
    tokens: list[int]
