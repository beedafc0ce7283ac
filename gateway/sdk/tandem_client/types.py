"""Typed results, converted from the protobuf responses by pure functions.

A stream yields one GenerateChunk per server message; `Completion.from_chunks` joins them. The
last chunk carries finish_reason, usage and timings. Logprobs (requested with the sampling
parameter `logprobs=N`) are read only where the stubs' GenerateResponse has a `logprobs` field
(TokenLogprobs: token_id, logprob, top_token_ids, top_logprobs); with older stubs they are None.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Iterable

from tandem_client._pb import common_pb2, generation_pb2


class FinishReason(str, enum.Enum):
    """Why generation ended (proto FinishReason without the prefix)."""

    STOP = "stop"      # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"    # the server ended it early (shutting down); the text so far is all

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
    """Token counts of a request (last chunk only)."""

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


def _logprobs_of(pb: generation_pb2.GenerateResponse) -> tuple[TokenLogprob, ...] | None:
    """One entry per token id of the message; None when the stubs have no `logprobs` field or
    the server sent none."""
    if "logprobs" not in pb.DESCRIPTOR.fields_by_name:
        return None
    return tuple(TokenLogprob.from_pb(e) for e in pb.logprobs) or None


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    """One streamed message: the tokens generated since the previous one and their text (UTF-8
    safe: a character split over tokens arrives whole, later)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None  # set on the last chunk only
    usage: Usage | None = None                 # last chunk only
    timings: PhaseTimings | None = None        # last chunk only
    logprobs: tuple[TokenLogprob, ...] | None = None  # when requested and the server sends them

    @classmethod
    def from_pb(cls, pb: generation_pb2.GenerateResponse) -> GenerateChunk:
        return cls(request_id=pb.request_id, text=pb.text, token_ids=tuple(pb.token_ids),
                   finish_reason=FinishReason.from_pb(pb.finish_reason),
                   usage=_from_fields(Usage, pb.usage) if pb.HasField("usage") else None,
                   timings=(_from_fields(PhaseTimings, pb.timings)
                            if pb.HasField("timings") else None),
                   logprobs=_logprobs_of(pb))


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole generation: every chunk's text and token ids joined, the last one's metadata."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    usage: Usage | None
    timings: PhaseTimings | None
    logprobs: tuple[TokenLogprob, ...] | None = None

    @classmethod
    def from_chunks(cls, chunks: Iterable[GenerateChunk]) -> Completion:
        chunks = list(chunks)
        if not chunks:
            raise ValueError("a generation has at least one chunk (the last carries usage)")
        last = chunks[-1]
        logprobs = tuple(lp for c in chunks for lp in c.logprobs or ())
        return cls(request_id=last.request_id, text="".join(c.text for c in chunks),
                   token_ids=tuple(t for c in chunks for t in c.token_ids),
                   finish_reason=last.finish_reason, usage=last.usage, timings=last.timings,
                   logprobs=logprobs or None)


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
