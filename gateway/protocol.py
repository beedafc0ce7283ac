"""OpenAI request bodies for /v1/completions and /v1/chat/completions.

Unknown fields are ignored (never a 422). Fields are parsed leniently here; what Tandem does not
support yet (n > 1, logprobs, min_p, repetition_penalty, penalties) is rejected with a 400 by
`gateway.convert`, so that the message can say "not supported yet" instead of "invalid".
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


class SamplingRequest(_Lenient):
    """Fields shared by completions and chat completions."""

    # Served model name; None means the only model served.
    model: str | None = None
    # Most tokens to generate; None means up to the context length.
    max_tokens: int | None = None
    # Newer name of max_tokens; used when max_tokens is not given.
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    # Extra (vLLM) sampling fields; top_k <= 0 means off.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    # One string or a list; excluded from the returned text.
    stop: str | list[str] | None = None
    # Extra: token ids that end generation, and generating past EOS.
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def max_new_tokens(self) -> int | None:
        """max_tokens, else max_completion_tokens, else None (fill the context)."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    # Number of log probabilities per token: not supported yet.
    logprobs: int | None = None
    echo: bool = False
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
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Extra (vLLM): render the assistant header after the last message (default True).
    add_generation_prompt: bool = True
