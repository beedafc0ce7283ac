"""The choices of one API request: the branches (n) of one or more prompts (a batch), merged
from their Decode.Generate streams, and best_of's pick.

    choices = Choices(streams, n, best_of, keep_logprobs)   one stream per prompt
    async for index, resp in choices:      index = prompt * n + choice (as vLLM), = resp.index
    await choices.close()                  closes every stream (an open call is cancelled)

The streams are read concurrently and messages come out as they arrive. If one fails, the
others are closed at once (their requests abort on the tiers, their blocks are freed) and its
error is raised.

best_of > n: a prompt's messages are held until its best_of branches have all finished; then
the n with the highest cumulative logprob (the sum of their chosen tokens' raw logprobs; ties:
the lower branch) come out, in that order, one message each carrying all its tokens. Each
keeps its own usage, except the last, which also counts the tokens of the branches not chosen
(all were generated). The tier is asked for the chosen tokens' logprobs for the ranking
(convert.sampling_from_request); unless the client asked too (`keep_logprobs`), they are left
out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Sequence

from engine.tokenizer import Tokenizer
from gateway.backend import RequestStream
from protos.tandem.v1 import common_pb2, generation_pb2

Message = generation_pb2.GenerateResponse


def rank_branches(logprobs: Sequence[Sequence[common_pb2.TokenLogprobs]], n: int) -> list[int]:
    """The n branches with the highest cumulative logprob, best first (ties: lower branch)."""
    scores = [sum(entry.logprob for entry in branch) for branch in logprobs]
    return sorted(range(len(scores)), key=lambda b: (-scores[b], b))[:n]


class Choices:
    """Single event loop; iterate once, then `close()` (idempotent)."""

    def __init__(self, streams: Sequence[RequestStream], n: int, best_of: int,
                 keep_logprobs: bool) -> None:
        self.streams, self.n, self.best_of = list(streams), n, best_of
        self.keep_logprobs = keep_logprobs
        self.started = min(stream.started for stream in self.streams)
        self.final: Message | None = None  # the last message, once every choice finished
        self.finals: dict[int, Message] = {}  # choice -> its finish message
        self.logprobs: dict[int, list[common_pb2.TokenLogprobs]] = {}  # choice -> its tokens'
        self._ready: deque[Message] = deque()
        self._held: dict[int, list[Message]] = {}  # best_of > n: prompt -> its messages so far
        self._pending: dict[asyncio.Future, int] | None = None  # a read -> its prompt

    @property
    def num_choices(self) -> int:
        return len(self.streams) * self.n

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.streams[0].tokenizer

    @property
    def num_prompt_tokens(self) -> int:
        return sum(stream.num_prompt_tokens for stream in self.streams)

    @property
    def num_generated_tokens(self) -> int:
        """Every branch's tokens so far (best_of's not chosen included)."""
        return sum(stream.num_generated_tokens for stream in self.streams)

    @property
    def ttft_s(self) -> float | None:
        firsts = [s.first_token_at for s in self.streams if s.first_token_at is not None]
        return min(firsts) - self.started if firsts else None

    def usage(self) -> common_pb2.Usage:
        """Each prompt's tokens once, every generated token (all branches, all prompts)."""
        cached = sum(final.usage.cached_prompt_tokens for stream in self.streams
                     for index, final in stream.finals.items() if index == 0)
        return common_pb2.Usage(prompt_tokens=self.num_prompt_tokens,
                                completion_tokens=self.num_generated_tokens,
                                cached_prompt_tokens=cached)

    def timings(self) -> common_pb2.PhaseTimings:
        """The phases of the prompt that finished last; draft counts summed over all."""
        timings = common_pb2.PhaseTimings()
        finals = [s.final for s in self.streams if s.final is not None]
        if finals:
            timings.CopyFrom(finals[-1].timings if self.final is None else self.final.timings)
            timings.num_draft_tokens = sum(f.timings.num_draft_tokens for f in finals)
            timings.num_accepted_draft_tokens = sum(f.timings.num_accepted_draft_tokens
                                                    for f in finals)
        return timings

    def __aiter__(self) -> Choices:
        return self

    async def __anext__(self) -> tuple[int, Message]:
        """The next message, `index` renumbered to the request's choice. Raises the first
        failed stream's ApiError (after closing the others), StopAsyncIteration at the end."""
        if self._pending is None:
            self._pending = {}
            for prompt in range(len(self.streams)):
                self._read(prompt)
        while not self._ready:
            if not self._pending:
                raise StopAsyncIteration
            done, _ = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            for read in sorted(done, key=self._pending.get):
                prompt = self._pending.pop(read)
                if read.exception() is not None:
                    await self.close()
                    raise read.exception()
                self._take(prompt, read.result())
        resp = self._ready.popleft()
        self.record(resp)
        return resp.index, resp

    def record(self, resp: Message) -> None:
        """Books a message on its way out: its choice's logprobs and finish, the request's
        end (`final`: the message that finished the last choice)."""
        self.logprobs.setdefault(resp.index, []).extend(resp.logprobs)
        if resp.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finals[resp.index] = resp
            if len(self.finals) == self.num_choices:
                self.final = resp

    def _read(self, prompt: int) -> None:
        self._pending[asyncio.ensure_future(anext(self.streams[prompt]))] = prompt

    def _take(self, prompt: int, resp: Message) -> None:
        stream = self.streams[prompt]
        if stream.final is None:
            self._read(prompt)
        if self.best_of == self.n:
            resp.index += prompt * self.n
            self._ready.append(resp)
            return
        held = self._held.setdefault(prompt, [])
        held.append(resp)
        if stream.final is not None:
            self._ready.extend(self._best(prompt, stream, self._held.pop(prompt)))

    def _best(self, prompt: int, stream: RequestStream, held: list[Message]) -> list[Message]:
        """The chosen branches of a finished best_of prompt, one message each."""
        chosen = rank_branches(stream.logprobs, self.n)
        out = []
        for rank, branch in enumerate(chosen):
            mine = [r for r in held if r.index == branch]
            final = stream.finals[branch]
            message = Message(request_id=held[0].request_id, index=prompt * self.n + rank,
                              token_ids=[t for r in mine for t in r.token_ids],
                              text="".join(r.text for r in mine),
                              finish_reason=final.finish_reason, usage=final.usage)
            if self.keep_logprobs:
                message.logprobs.extend(e for r in mine for e in r.logprobs)
            out.append(message)
        out[-1].usage.completion_tokens += sum(
            count for b, count in enumerate(stream.num_tokens) if b not in chosen)
        out[-1].timings.CopyFrom(stream.final.timings)
        return out

    async def close(self) -> None:
        for read in self._pending or ():
            read.cancel()
        self._pending = {}
        for stream in self.streams:
            await stream.close()

