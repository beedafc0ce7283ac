"""Sampling parameters as a domain object (torch-free; the gateway validates with it too)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

from engine.errors import InvalidRequestError
from protos.tandem.v1 import common_pb2

# Temperatures below this are greedy (as vLLM): dividing logits by them overflows float32.
GREEDY_BELOW_TEMPERATURE = 1e-5
# Limits of the OpenAI API: |presence / frequency penalty| <= 2, |logit bias| <= 100, and at
# most 300 biased tokens.
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 300
# Most top log probabilities per token (OpenAI's limit for logprobs / top_logprobs).
MAX_LOGPROBS = 20
# Prompt logprobs travel in one message (the KV transfer's TransferComplete, then the first
# GenerateResponse), under gRPC's 16 MiB limit: their encoded size is at most
# PROMPT_LOGPROB_BYTES_PER_TOKEN + PROMPT_LOGPROB_BYTES_PER_TOP * k per prompt token (varint ids
# below 2**32, float32 values, field tags and lengths), bounded by MAX_PROMPT_LOGPROB_BYTES.
PROMPT_LOGPROB_BYTES_PER_TOKEN = 21
PROMPT_LOGPROB_BYTES_PER_TOP = 9
MAX_PROMPT_LOGPROB_BYTES = 12 * 2**20


# How a tier's INVALID_ARGUMENT about a request's grammar begins (the gateway then names the
# request field that carried it).
STRUCTURED_ERROR_PREFIX = "structured output: "


class InvalidSamplingParam(InvalidRequestError):
    """A sampling field is out of range; `param` names it (the gateway's error names it too)."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param} {problem}")
        self.param = param


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A grammar the output must follow (engine/structured.py compiles it): `kind` a field name
    of common.proto's StructuredOutput oneof, `spec` its text (a JSON Schema, a regex, EBNF, a structural tag as JSON;
    json_object: ""; choice: a JSON list of the strings). Hashable: the grammar cache's key."""

    kind: str
    spec: str = ""

    @property
    def choices(self) -> list[str]:
        return json.loads(self.spec) if self.kind == "choice" else []

    @classmethod
    def from_pb(cls, pb: common_pb2.StructuredOutput) -> "StructuredOutput | None":
        """None when no kind is set (or json_object is false)."""
        kind = pb.WhichOneof("kind")
        if kind is None or (kind == "json_object" and not pb.json_object):
            return None
        if kind == "choice":
            values = list(pb.choice.values)
            if not values or not all(values):
                raise InvalidSamplingParam("structured_output.choice",
                                           "needs at least one string, none empty")
            return cls(kind, json.dumps(values, ensure_ascii=False))
        if kind == "json_object":
            return cls(kind)
        text = getattr(pb, kind)
        if not text:
            raise InvalidSamplingParam(f"structured_output.{kind}", "is empty")
        if kind in ("json_schema", "structural_tag"):
            _check_json_object(f"structured_output.{kind}", text)
        return cls(kind, text)

    def to_pb(self) -> common_pb2.StructuredOutput:
        if self.kind == "choice":
            return common_pb2.StructuredOutput(choice=common_pb2.Choices(values=self.choices))
        if self.kind == "json_object":
            return common_pb2.StructuredOutput(json_object=True)
        return common_pb2.StructuredOutput(**{self.kind: self.spec})


def _check_json_object(param: str, text: str) -> None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidSamplingParam(param, f"is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise InvalidSamplingParam(param, "must be a JSON object")


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
    # The first min_tokens output tokens never end the request (EOS, stop ids, stop strings);
    # the sampler masks EOS (unless ignore_eos) and stop_token_ids until then.
    min_tokens: int = 0
    # Logits processors (engine/sampler.py applies them in its documented order); each is off
    # at its default.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    # (token id, bias) pairs in ascending id order: a frozen form of OpenAI's map.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Log probabilities of each generated token and of the `logprobs` most likely ones (0: the
    # chosen token's only); None: none. Raw log-softmax, see engine/sampler.py.
    logprobs: int | None = None
    # Log probabilities of every prompt token after the first, with the `prompt_logprobs` most
    # likely at each position (0..20); None: none. Computed by the prefill tier (no prefix-cache
    # hits for such a request); check_prompt_logprobs bounds them by the prompt's length.
    prompt_logprobs: int | None = None
    # The grammar the output must follow; None: free text.
    structured_output: StructuredOutput | None = None
    # Output text (not token ids or logprobs), as vLLM: special tokens' text is left out unless
    # skip_special_tokens is False; the stop string (and a stop token's text) is cut unless
    # include_stop_str_in_output (engine/detokenizer.py, decode_service/engine.py).
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        """Argmax: temperature 0, or one so small (< GREEDY_BELOW_TEMPERATURE) that sampling
        would pick the argmax anyway, after overflowing."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)

    def validate(self) -> "SamplingParams":
        """Returns self; raises InvalidSamplingParam (an InvalidRequestError) naming the bad
        field."""
        if self.max_tokens < 1:
            raise InvalidSamplingParam("max_tokens", f"must be at least 1, got {self.max_tokens}")
        _check_range("temperature", self.temperature, 0.0, 100.0)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParam("top_p", f"must be in (0, 1], got {self.top_p:.7g}")
        if self.top_k < 0:
            raise InvalidSamplingParam("top_k", f"must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise InvalidSamplingParam("stop", "strings must be non-empty")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidSamplingParam("min_tokens", f"must be in [0, max_tokens="
                                       f"{self.max_tokens}], got {self.min_tokens}")
        _check_range("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
        _check_range("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
        if not (self.repetition_penalty > 0.0 and math.isfinite(self.repetition_penalty)):
            raise InvalidSamplingParam("repetition_penalty", f"must be a finite number > 0, got "
                                       f"{self.repetition_penalty:.7g}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidSamplingParam("logprobs", f"must be in [0, {MAX_LOGPROBS}], got "
                                       f"{self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidSamplingParam("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got "
                                       f"{self.prompt_logprobs}")
        self._validate_logit_bias()
        return self

    def check_prompt_logprobs(self, num_prompt_tokens: int) -> None:
        """Raises InvalidSamplingParam when the prompt logprobs asked for would not fit one
        message (see MAX_PROMPT_LOGPROB_BYTES)."""
        if self.prompt_logprobs is None:
            return
        per_token = (PROMPT_LOGPROB_BYTES_PER_TOKEN
                     + PROMPT_LOGPROB_BYTES_PER_TOP * self.prompt_logprobs)
        if num_prompt_tokens * per_token > MAX_PROMPT_LOGPROB_BYTES:
            raise InvalidSamplingParam(
                "prompt_logprobs", f"{self.prompt_logprobs} for a {num_prompt_tokens}-token "
                f"prompt would not fit one message: at most "
                f"{MAX_PROMPT_LOGPROB_BYTES // per_token} prompt tokens with this count")

    def _validate_logit_bias(self) -> None:
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise InvalidSamplingParam("logit_bias", f"may bias at most {MAX_LOGIT_BIAS_TOKENS} "
                                       f"tokens, got {len(self.logit_bias)}")
        for token_id, bias in self.logit_bias:
            if token_id < 0:
                raise InvalidSamplingParam("logit_bias", f"token ids must be >= 0, got {token_id}")
            _check_range("logit_bias", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)

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
            presence_penalty=pb.presence_penalty,
            frequency_penalty=pb.frequency_penalty,
            repetition_penalty=(pb.repetition_penalty if pb.HasField("repetition_penalty")
                                else 1.0),
            min_p=pb.min_p,
            logit_bias=tuple(sorted(pb.logit_bias.items())),
            logprobs=pb.logprobs if pb.HasField("logprobs") else None,
            prompt_logprobs=pb.prompt_logprobs if pb.HasField("prompt_logprobs") else None,
            structured_output=(StructuredOutput.from_pb(pb.structured_output)
                               if pb.HasField("structured_output") else None),
            skip_special_tokens=(pb.skip_special_tokens if pb.HasField("skip_special_tokens")
                                 else True),
            include_stop_str_in_output=pb.include_stop_str_in_output,
        ).validate()

    def to_pb(self) -> common_pb2.SamplingParams:
        """The message; fields at their defaults are left unset."""
        pb = common_pb2.SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                                       top_p=self.top_p, top_k=self.top_k, stop=list(self.stop),
                                       stop_token_ids=list(self.stop_token_ids),
                                       ignore_eos=self.ignore_eos, logit_bias=dict(self.logit_bias),
                                       include_stop_str_in_output=self.include_stop_str_in_output)
        if self.seed is not None:
            pb.seed = self.seed
        if self.logprobs is not None:
            pb.logprobs = self.logprobs
        if self.prompt_logprobs is not None:
            pb.prompt_logprobs = self.prompt_logprobs
        if self.structured_output is not None:
            pb.structured_output.CopyFrom(self.structured_output.to_pb())
        for name, default in _OPTIONAL_DEFAULTS:
            value = getattr(self, name)
            if value != default:
                setattr(pb, name, value)
        return pb


# Optional message fields to_pb leaves unset at these values.
_OPTIONAL_DEFAULTS = (("min_tokens", 0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                      ("repetition_penalty", 1.0), ("min_p", 0.0), ("skip_special_tokens", True))


def branch_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """The sampling of branch `index` of an n > 1 request: seed + index (mod 2**64), as vLLM,
    so branch 0 is the request with n = 1; unseeded branches differ by their fresh seeds."""
    if sampling.seed is None or index == 0:
        return sampling
    return replace(sampling, seed=(sampling.seed + index) % (1 << 64))


def _check_range(param: str, value: float, low: float, high: float) -> None:
    """low <= value <= high (NaN fails). Values print with float32's 7 digits: over the wire
    they are float32, and 3.1 should not read 3.0999999046325684."""
    if not low <= value <= high:
        raise InvalidSamplingParam(param, f"must be in [{low:g}, {high:g}], got {value:.7g}")


class TokenLogprobs(NamedTuple):
    """Log probabilities of one generated token: the chosen token's, and the top ones (most
    likely first, ties by ascending id). The domain form of common_pb2.TokenLogprobs."""

    token_id: int
    logprob: float
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()

    def to_pb(self) -> common_pb2.TokenLogprobs:
        return common_pb2.TokenLogprobs(token_id=self.token_id, logprob=self.logprob,
                                        top_token_ids=self.top_token_ids,
                                        top_logprobs=self.top_logprobs)

    @classmethod
    def from_pb(cls, pb: common_pb2.TokenLogprobs) -> "TokenLogprobs":
        return cls(pb.token_id, pb.logprob, tuple(pb.top_token_ids), tuple(pb.top_logprobs))
