"""Server-sent events for the OpenAI streaming APIs, and the per-request response shape.

Frames are `data: {json}\n\n`, `data: [DONE]` last; `: ping` comment lines keep idle
connections open. Each chunk carries one choice, `index` naming it (n > 1 and batches
of prompts interleave their choices); the first chat chunk of a choice carries `delta.role`;
each choice ends with its own chunk with a finish reason, and the request's last one carries
`tandem_timings`; with stream_options.include_usage one last chunk has `choices: []` and the
usage (every choice's tokens, each prompt's once); with stream_options.continuous_usage_stats
every chunk carries the usage so far (the request's last, the request's usage). Completions
with echo: a choice's first chunk carries its prompt's text (and, with logprobs, its tokens'
logprobs) before the first token's. Chat with tools to parse: content streams until a
`<tool_call>` begins, then each completed call comes as a `delta.tool_calls` entry. An error
after the first byte is a `data: {"error": ...}` frame, then [DONE]; when the error is the
request's deadline (or an Abort), the usage chunk, with the usage so far, comes before it.
Every exit path (client gone included) closes the request stream, which cancels the gRPC call.
The client is watched from the start: while waiting for the first response (`stream_response`)
by `wait_unless_disconnected`, afterwards by StreamingResponse (it reads the ASGI receive
channel for `http.disconnect` alongside the body under ASGI spec < 2.4, as uvicorn declares).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, NamedTuple, Sequence

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from gateway import convert
from gateway.choices import Choices
from gateway.errors import ApiError
from gateway.tools import ToolCallParser, parse_tool_calls
from protos.tandem.v1 import common_pb2, generation_pb2


@dataclass(frozen=True)
class Format:
    """How one endpoint shapes its responses (completions or chat)."""

    chunk_object: str
    body: Callable[..., dict[str, Any]]
    is_chat: bool


COMPLETION = Format("text_completion", convert.completion_body, False)
CHAT = Format("chat.completion.chunk", convert.chat_body, True)


class Echo(NamedTuple):
    """Completions with echo: the prompt's text and first token go before the completion's."""

    text: str
    first_token_id: int
    only: bool  # max_tokens 0: the prompt alone (the one token the tiers generate is left out)


@dataclass(slots=True)
class Call:
    """One accepted request: what to answer with, and its open choices."""

    request_id: str
    model: str
    created: int
    fmt: Format
    choices: Choices
    include_usage: bool
    continuous_usage: bool
    echoes: Sequence[Echo] | None = None  # completions with echo: one per prompt
    # vLLM's prompt_logprobs asked for: how many top entries per prompt token
    prompt_top: int | None = None
    parse_tools: bool = False  # chat with tools to parse (gateway.tools)
    # completions, per choice: text_offset of the next token's logprobs (the length of the
    # tokens' text so far, as vLLM)
    text_offsets: dict[int, int] = field(default_factory=dict)
    tool_parsers: dict[int, ToolCallParser] = field(default_factory=dict)  # per choice

    def body(self, text: str | None, finish: str | None,
             logprobs: Sequence[common_pb2.TokenLogprobs] | None = None, index: int = 0,
             opening: bool = False, **kw: Any) -> dict[str, Any]:
        """The response body or chunk for choice `index`. When the request asked for
        logprobs, the choice carries those of `logprobs` (a stream chunk's tokens); None: every
        token's so far (the whole response, once the stream ended). `opening`: the body is the
        whole choice or its first chunk, which carries the echoed prompt and the prompt
        logprobs."""
        prompt = index // self.choices.n
        echo = self.echoes[prompt] if self.echoes and opening else None
        if self.echoes and self.echoes[prompt].only:
            text, logprobs = "", ()
        if echo is not None:
            text = echo.text + (text or "")
        if self.wants_logprobs:
            entries = self.choices.logprobs.get(index, []) if logprobs is None else logprobs
            kw["logprobs"] = self._logprobs(entries, index, echo)
        body = self.fmt.body(self.request_id, self.model, self.created, text, finish,
                             index=index, **kw)
        if opening and self.prompt_top is not None:  # vLLM: per choice; chat: per response
            where = body if self.fmt.is_chat else body["choices"][0]
            where["prompt_logprobs"] = convert.vllm_prompt_logprobs(
                self.choices.streams[prompt].prompt_logprobs, self.choices.tokenizer,
                self.prompt_top)
        return body

    @property
    def wants_logprobs(self) -> bool:
        return self.choices.keep_logprobs

    def _logprobs(self, entries: Sequence[common_pb2.TokenLogprobs], index: int,
                  echo: Echo | None = None) -> dict[str, Any]:
        """Choice `index`'s logprobs for these tokens; with `echo`, its prompt's first."""
        tokenizer = self.choices.tokenizer
        if self.fmt.is_chat:
            return convert.chat_logprobs(entries, tokenizer)
        parts = []
        if echo is not None:
            stream = self.choices.streams[index // self.choices.n]
            parts.append(self._advance(index, convert.echo_logprobs(
                echo.first_token_id, stream.prompt_logprobs, tokenizer,
                stream.request.sampling.logprobs)))
        parts.append(self._advance(index, convert.completion_logprobs(
            entries, tokenizer, self.text_offsets.get(index, 0))))
        return convert.joined_logprobs(*parts)

    def _advance(self, index: int, logprobs: dict[str, Any]) -> dict[str, Any]:
        """Moves choice `index`'s text_offset past these completions logprobs' tokens."""
        if logprobs["tokens"]:
            self.text_offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return logprobs

    def tool_chunk(self, index: int, text: str, finish: str | None
                   ) -> tuple[str, dict[str, Any], str | None]:
        """A streamed choice's content, its chunk's `tool_calls` (calls completed by this
        text; at the end, an unclosed last one too) and finish reason ("tool_calls" for a
        choice that stopped after calling)."""
        if not self.parse_tools:
            return text, {}, finish
        parser = self.tool_parsers.setdefault(index, ToolCallParser())
        content, calls = parser.feed(text)
        if finish is not None:
            rest, more = parser.finish()
            content, calls = content + rest, calls + more
        return content, {"tool_calls": calls} if calls else {}, _tool_finish(parser, finish)

    def whole(self, text: str, finish: str | None, index: int = 0) -> dict[str, Any]:
        """The non-streamed body of choice `index`'s whole text (tool calls parsed when asked;
        the echoed prompt and prompt logprobs when asked)."""
        content, calls = parse_tool_calls(text) if self.parse_tools else (text, [])
        if not calls:
            return self.body(text, finish, index=index, opening=True)
        return self.body(content, "tool_calls" if finish == "stop" else finish, index=index,
                         opening=True, tool_calls=calls)

    def final_fields(self) -> dict[str, Any]:
        """The request's usage and timings (once every choice finished)."""
        e2e = time.monotonic() - self.choices.started
        timings = convert.timings_dict(self.choices.timings(), gateway_e2e_s=e2e,
                                       gateway_time_to_first_token_s=self.choices.ttft_s or e2e)
        return {"usage": convert.usage_dict(self.choices.usage()), "tandem_timings": timings}

    def chunk_usage(self) -> dict[str, Any]:
        """A content chunk's `usage` field: the counts so far with continuous_usage_stats, null
        with include_usage only (as OpenAI), absent otherwise."""
        if self.continuous_usage:
            return {"usage": convert.usage_so_far(self.choices.num_prompt_tokens,
                                                  self.choices.num_generated_tokens)}
        return {"usage": None} if self.include_usage else {}


def _tool_finish(parser: ToolCallParser, finish: str | None) -> str | None:
    return "tool_calls" if finish == "stop" and parser.calls else finish


def sse_chunks(call: Call, index: int, resp: generation_pb2.GenerateResponse,
               first: bool) -> list[str]:
    """SSE frames for one tier response of choice `index` (`first`: its first): text, then
    (on its last) the finish reason, and on the request's last, timings and usage."""
    text, calls, finish = call.tool_chunk(index, resp.text,
                                          convert.finish_reason(resp.finish_reason))
    if not (text or calls or finish or first or resp.logprobs):
        return []
    kwargs = {"stream": True, "first": first, **calls} if call.fmt.is_chat else {}
    body = call.body(text, finish, list(resp.logprobs), index=index, opening=first, **kwargs)
    if call.choices.final is not resp:
        return [convert.sse_event({**body, **call.chunk_usage()})]
    fields = call.final_fields()
    usage = {"usage": fields["usage"]} if call.continuous_usage else call.chunk_usage()
    frames = [convert.sse_event({**body, **usage, "tandem_timings": fields["tandem_timings"]})]
    if call.include_usage:
        frames.append(convert.sse_event(convert.usage_chunk(
            call.fmt.chunk_object, call.request_id, call.model, call.created, fields["usage"])))
    return frames


def usage_before_error(call: Call, err: ApiError) -> list[str]:
    """With stream_options.include_usage (or continuous_usage_stats), a stream the server ended
    early (its deadline, or an Abort) gets the usage chunk, with the usage so far, before its
    error frame."""
    if not (call.include_usage or call.continuous_usage):
        return []
    if not any(stream.ended_early(err) for stream in call.choices.streams):
        return []
    usage = convert.usage_dict(common_pb2.Usage(
        prompt_tokens=call.choices.num_prompt_tokens,
        completion_tokens=call.choices.num_generated_tokens))
    return [convert.sse_event(convert.usage_chunk(call.fmt.chunk_object, call.request_id,
                                                  call.model, call.created, usage))]


async def _next_or_ping(pending: asyncio.Future, keepalive_s: float) -> AsyncIterator[str]:
    """Yields a ping for every keepalive_s the pending read stays unanswered."""
    while not (await asyncio.wait({pending}, timeout=keepalive_s))[0]:
        yield convert.SSE_PING


async def _sse(call: Call, pending: asyncio.Future, keepalive_s: float) -> AsyncIterator[str]:
    """The SSE body; `pending` reads the first response (keepalive_s already waited on it)."""
    seen: set[int] = set()  # the choices that had a chunk
    try:
        if not pending.done():
            yield convert.SSE_PING
        while True:
            async for ping in _next_or_ping(pending, keepalive_s):
                yield ping
            try:
                index, resp = pending.result()
            except StopAsyncIteration:
                break
            except ApiError as e:
                for frame in usage_before_error(call, e):
                    yield frame
                yield convert.sse_event(e.to_dict())
                break
            for frame in sse_chunks(call, index, resp, index not in seen):
                yield frame
            seen.add(index)
            if call.choices.final is not None:
                break
            pending = asyncio.ensure_future(anext(call.choices))
        yield convert.SSE_DONE
    finally:
        pending.cancel()
        await call.choices.close()


class _SSEResponse(StreamingResponse):
    """Closes the request stream however the response ends (client gone before the first byte
    included)."""

    def __init__(self, call: Call, pending: asyncio.Future, keepalive_s: float) -> None:
        super().__init__(_sse(call, pending, keepalive_s), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Request-Id": call.request_id})
        self._call, self._pending = call, pending

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._pending.cancel()
            await self._call.choices.close()


# the client
async def until_disconnected(request: Request) -> None:
    """Returns once the client has disconnected, at once (no polling): reads the ASGI receive
    channel until `http.disconnect`. Only after the request body has been read: it drops
    any body message it reads."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_unless_disconnected(request: Request, work: asyncio.Future,
                                   timeout_s: float | None = None) -> bool:
    """Waits until `work` is done, the client disconnects, or timeout_s passes (None: no
    limit). True when the client is gone; `work` is left as it is (the caller cancels it).
    Raises what reading the receive channel raised."""
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, timeout=timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
        if not watch.done():
            return False
        watch.result()
        return True
    finally:
        watch.cancel()


def _discard(pending: asyncio.Future) -> None:
    """Cancels `pending`, or marks its exception retrieved if it already failed."""
    if not pending.cancel() and not pending.cancelled():
        pending.exception()


async def stream_response(request: Request, call: Call, keepalive_s: float) -> Response:
    """Waits up to keepalive_s for the first response so early errors get an HTTP status.
    If the client disconnects meanwhile, closes the request stream (cancelling the call
    aborts the request on the tiers) and returns a 499 nobody reads, without waiting more."""
    pending = asyncio.ensure_future(anext(call.choices))
    try:
        gone = await wait_unless_disconnected(request, pending, keepalive_s)
        if not gone and pending.done() and isinstance(pending.exception(), ApiError):
            raise pending.exception()
    except BaseException:
        _discard(pending)
        await call.choices.close()
        raise
    if gone:
        _discard(pending)
        await call.choices.close()
        return Response(status_code=499)
    return _SSEResponse(call, pending, keepalive_s)
