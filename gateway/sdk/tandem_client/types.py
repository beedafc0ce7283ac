"""Typed results, converted from the protobuf responses by pure functions.

A stream yields one GenerateChunk per server message, tagged with its branch `index` (n > 1:
the branches' chunks interleave); `Completion.from_chunks` joins them into one Choice per
branch. Each branch's last chunk carries its finish_reason and usage, the request's last one
the timings, the first one the prompt logprobs (when requested). Logprobs (requested with the sampling
parameter `logprobs=N`) are read only where the stubs' GenerateResponse has a `logprobs` field
(TokenLogprobs: token_id, logprob, top_token_ids, top_logprobs); with older stubs they are None.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from tandem_client._pb import common_pb2, generation_pb2


class FinishReason(str, enum.Enum):
    """Why generation ended (proto FinishReason without the prefix)."""

    STOP = "stop"      # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    # the server ended it early (shutting down, or Abort or a deadline: the stream then raises
    # Cancelled or DeadlineExceeded); the text so far is all
    ABORT = "abort"

    @classmethod
    def from_pb(cls, value: int) -> FinishReason | None:
        """None for FINISH_REASON_UNSPECIFIED (every message but the last)."""
        name = common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_")
        return cls[name] if name in cls.__members__ else None


def _from_fields(cls: type, pb: Any) -> Any:
    """cls built from the same-named fields of message pb (fields the proto lacks are 0)."""
    return cls(**{f.name: getattr(pb, f.name, 0) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts: a branch's (on its last chunk, Choice.usage) or the request's
    (Completion.usage). A branch's counts the whole prompt and that branch's completion
    tokens; the request's counts the prompt once and sums the branches' completion tokens."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True, slots=True)
class PhaseTimings:
    """Where the request spent its time, measured by the tiers; seconds (last chunk only)."""

    queue_s: float
    prefill_queue_s: float
    prefill_s: float
    transfer_bytes: int
    transfer_s: float
    decode_s: float
    time_to_first_token_s: float


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability (the model's raw log-softmax) and the most likely
    tokens', most likely first."""

    token_id: int
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()

    @classmethod
    def from_pb(cls, pb: Any) -> TokenLogprob:
        """From a TokenLogprobs message (its top ids and logprobs are parallel lists)."""
        top = zip(getattr(pb, "top_token_ids", ()), getattr(pb, "top_logprobs", ()))
        return cls(pb.token_id, pb.logprob, tuple(TopLogprob(i, lp) for i, lp in top))


def _logprobs_of(pb: generation_pb2.GenerateResponse,
                 field: str) -> tuple[TokenLogprob, ...] | None:
    """The message's `field` (logprobs: one entry per token id; prompt_logprobs: one per
    prompt token but the first) as TokenLogprobs; None when the stubs lack the field or the
    server sent none."""
    if field not in pb.DESCRIPTOR.fields_by_name:
        return None
    return tuple(TokenLogprob.from_pb(e) for e in getattr(pb, field)) or None


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """One streamed message of branch `index` (0..n-1; always 0 with n = 1): the tokens it
    generated since its previous message and their text (UTF-8 safe: a character split over
    tokens arrives whole, later). With n > 1 the branches' chunks interleave."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None  # set on each branch's last chunk only
    usage: Usage | None = None                 # each branch's last chunk only (see Usage)
    timings: PhaseTimings | None = None        # the request's last chunk only
    logprobs: tuple[TokenLogprob, ...] | None = None  # when requested and the server sends them
    index: int = 0                             # the branch (choice) this chunk belongs to
    # with prompt_logprobs=N, on the first chunk only: one entry per prompt token from the
    # second on (the first has no logprob); else None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    @classmethod
    def from_pb(cls, pb: generation_pb2.GenerateResponse) -> GenerateChunk:
        return cls(request_id=pb.request_id, text=pb.text, token_ids=tuple(pb.token_ids),
                   finish_reason=FinishReason.from_pb(pb.finish_reason),
                   usage=_from_fields(Usage, pb.usage) if pb.HasField("usage") else None,
                   timings=(_from_fields(PhaseTimings, pb.timings)
                            if pb.HasField("timings") else None),
                   logprobs=_logprobs_of(pb, "logprobs"), index=getattr(pb, "index", 0),
                   prompt_logprobs=_logprobs_of(pb, "prompt_logprobs"))


@dataclass(frozen=True, slots=True)
class Choice:
    """One branch of a generation: its chunks' text, token ids and logprobs joined, and its
    last chunk's finish reason and usage (None when the stream ended before that branch did
    and the server sent no last message for it)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    usage: Usage | None
    logprobs: tuple[TokenLogprob, ...] | None = None

    @classmethod
    def from_chunks(cls, index: int, chunks: Sequence[GenerateChunk]) -> Choice:
        """From branch `index`'s chunks, in the order they arrived."""
        last = next((c for c in reversed(chunks) if c.finish_reason is not None), None)
        logprobs = tuple(lp for c in chunks for lp in c.logprobs or ())
        return cls(index=index, text="".join(c.text for c in chunks),
                   token_ids=tuple(t for c in chunks for t in c.token_ids),
                   finish_reason=last.finish_reason if last else None,
                   usage=last.usage if last else None, logprobs=logprobs or None)


def total_usage(choices: Sequence[Choice]) -> Usage | None:
    """The request's usage from its branches': the prompt counted once, the completion tokens
    summed; None when no branch has usage."""
    usages = [c.usage for c in choices if c.usage is not None]
    if not usages:
        return None
    return Usage(prompt_tokens=usages[0].prompt_tokens,
                 completion_tokens=sum(u.completion_tokens for u in usages),
                 cached_prompt_tokens=usages[0].cached_prompt_tokens)


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole generation: one Choice per branch, in index order (n of them; one unless the
    call asked for n > 1), and the request's usage, timings and prompt logprobs.

    `text`, `token_ids`, `finish_reason` and `logprobs` are the first choice's (the only one
    with n = 1); with n > 1 read `choices`. `usage` is the request's: the prompt counted once,
    the completion tokens of every branch summed (with best_of > n, the branches not returned
    too); each choice has its own."""

    request_id: str
    choices: tuple[Choice, ...]
    usage: Usage | None
    timings: PhaseTimings | None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.choices[0].token_ids if self.choices else ()

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.choices[0].finish_reason if self.choices else None

    @property
    def logprobs(self) -> tuple[TokenLogprob, ...] | None:
        return self.choices[0].logprobs if self.choices else None

    @classmethod
    def from_chunks(cls, chunks: Iterable[GenerateChunk]) -> Completion:
        """Joins a stream's chunks (all of them, or those received before it failed) per
        branch. Raises ValueError without any chunk."""
        chunks = list(chunks)
        if not chunks:
            raise ValueError("a generation has at least one chunk (the last carries usage)")
        by_index: dict[int, list[GenerateChunk]] = {}
        for chunk in chunks:
            by_index.setdefault(chunk.index, []).append(chunk)
        choices = tuple(Choice.from_chunks(i, by_index[i]) for i in sorted(by_index))
        timings = next((c.timings for c in reversed(chunks) if c.timings is not None), None)
        prompt_logprobs = next((c.prompt_logprobs for c in chunks if c.prompt_logprobs), None)
        return cls(request_id=chunks[0].request_id, choices=choices, usage=total_usage(choices),
                   timings=timings, prompt_logprobs=prompt_logprobs)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The served model (GetModelInfo)."""

    name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    architecture: str

    @classmethod
    def from_pb(cls, pb: generation_pb2.ModelInfo) -> ModelInfo:
        return cls(name=pb.name, max_model_len=pb.max_model_len, vocab_size=pb.vocab_size,
                   eos_token_ids=tuple(pb.eos_token_ids), architecture=pb.architecture)
