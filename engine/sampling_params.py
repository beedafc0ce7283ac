"""Sampling parameters as a domain object (torch-free; the gateway validates with it too)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError
from protos.tandem.v1 import common_pb2

# Temperatures below this are greedy (as vLLM): dividing logits by them overflows float32.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # The first min_tokens output tokens never end the request (EOS, stop ids, stop strings).
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        """Argmax: temperature 0, or one so small (< GREEDY_BELOW_TEMPERATURE) that sampling
        would pick the argmax anyway, after overflowing."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def validate(self) -> "SamplingParams":
        """Returns self; raises InvalidRequestError naming the bad field."""
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                                      f"got {self.min_tokens}")
        return self

    @classmethod
    def from_pb(cls, pb: common_pb2.SamplingParams) -> "SamplingParams":
        return cls(
            max_tokens=pb.max_tokens,
            temperature=pb.temperature if pb.HasField("temperature") else 1.0,
            top_p=pb.top_p if pb.HasField("top_p") else 1.0,
            top_k=pb.top_k if pb.HasField("top_k") else 0,
            seed=pb.seed if pb.HasField("seed") else None,
            stop=tuple(pb.stop),
            stop_token_ids=tuple(pb.stop_token_ids),
            ignore_eos=pb.ignore_eos,
            min_tokens=pb.min_tokens,
        ).validate()

    def to_pb(self) -> common_pb2.SamplingParams:
        pb = common_pb2.SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                                       top_p=self.top_p, top_k=self.top_k, stop=list(self.stop),
                                       stop_token_ids=list(self.stop_token_ids),
                                       ignore_eos=self.ignore_eos)
        if self.seed is not None:
            pb.seed = self.seed
        if self.min_tokens:
            pb.min_tokens = self.min_tokens
        return pb
