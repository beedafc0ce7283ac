"""Speculative decoding on the decode tier: its configuration and the proposers of draft tokens.

A proposer looks at a running request and offers up to k tokens that may come next;
`NgramProposer` is prompt lookup (vLLM's `ngram` method): the longest suffix of the request's
tokens (max_n down to min_n tokens long) that also occurs earlier in them is matched at its most
recent earlier occurrence, and the tokens that followed it there are the proposal. Proposals
are point masses (one token per position, no probabilities), as are greedy draft models and
EAGLE heads; other proposers join behind the same `Proposer` interface.

`DraftModelProposer` (decode_service/draft.py, `--speculative-method draft --draft-model DIR`)
runs a smaller model with the same tokenizer greedily, from its own paged KV cache.

Each step the decode engine asks the proposer for up to `num_speculative_tokens` drafts for
every running request (none for a request that asked for logprobs); the scheduler schedules
them after the request's last token, the runner scores and verifies them (engine/speculative.py:
lossless, and a seeded request's tokens are those it gets without speculation), and the
scheduler keeps the verified tokens and rolls the rest back.

How many drafts (`draft_length`): drafting pays only while the step is memory-bound. Scoring a
draft costs the step little when the batch is small (the weights are read once however many
tokens ride along) and almost a token's full compute once the step's tokens saturate the
GPU. So each draft position j (1-based) is worth proposing only if its chance of acceptance,
alpha^j, exceeds the relative cost of one more scored token, `batch / saturation_tokens`
(clamped to [MIN_COST, 1]); alpha is the request's acceptance rate so far (Laplace-smoothed).
At or past saturation no request drafts: at high load speculation turns itself off, and the
step is the plain decoding step. That estimate knows nothing of what a step with drafts costs
beyond its tokens (it runs eagerly where plain decode replays a CUDA graph; a draft model runs
its own passes), so `SpeculationGovernor` checks it against measured throughput and keeps
speculation off, bar rarer and rarer probe steps, wherever it does not pay. A request that stopped drafting (its alpha too low) probes
with one draft every PROBE_EVERY steps, so a request whose text becomes repetitive picks up
again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Protocol, Sequence

import numpy as np

from engine.request import Request


logger = logging.getLogger("decode")

METHODS = ("ngram", "draft")
# Tokens per step at which a decode step stops being memory-bound (the default suits one
# H100/H200 with an 8B model: --speculative-saturation-tokens tunes it).
DEFAULT_SATURATION_TOKENS = 256
MIN_COST = 0.05  # a draft never counts as free
PROBE_EVERY = 16  # steps between one-draft probes of a request that stopped drafting
MAX_PROBE_INTERVAL = 512  # SpeculationGovernor: the longest run of steps between probes


@dataclass(frozen=True)
class SpeculativeConfig:
    """`--speculative-method`, `--num-speculative-tokens`, the n-gram lookup's window and the
    draft model's directory."""

    method: str
    num_tokens: int
    ngram_min: int = 1
    ngram_max: int = 3
    saturation_tokens: int = DEFAULT_SATURATION_TOKENS
    draft_model: Path | None = None  # method "draft"
    governor: bool = True  # SpeculationGovernor on (off: draft_length's estimate alone)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r} (have: {METHODS})")
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError("a draft model goes with --speculative-method draft, and only "
                             "with it")
        if self.num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_tokens}")
        if self.saturation_tokens < 1:
            raise ValueError(f"saturation_tokens must be at least 1, got {self.saturation_tokens}")

    def ngram_proposer(self) -> "NgramProposer":
        return NgramProposer(self.ngram_min, self.ngram_max)


def draft_length(max_k: int, num_drafted: int, num_accepted: int, batch_size: int,
                 saturation_tokens: int, steps_since_draft: int) -> int:
    """How many drafts to propose for one request this step (see the module docstring)."""
    cost = min(max(batch_size / saturation_tokens, MIN_COST), 1.0)
    if cost >= 1.0:
        return 0
    alpha = (num_accepted + 1) / (num_drafted + 2)
    k = 0
    while k < max_k and alpha ** (k + 1) > cost:
        k += 1
    if k == 0 and steps_since_draft >= PROBE_EVERY:
        return 1
    return k


def propose_drafts(config: SpeculativeConfig, proposer: "Proposer",
                   governor: "SpeculationGovernor", running: Sequence[Request]) -> None:
    """One step's proposals: sets `spec_token_ids` of every running request that is decoding
    (it lacks only its last token), except those that asked for logprobs or decode under a
    grammar (they decode one at a time), as many as `draft_length` finds worth it at this batch
    size, and none at all when the governor (if on) says drafting does not pay. The proposer
    first drops what it keeps for requests no longer running."""
    proposer.keep_only({r.request_id for r in running})
    if not running or (config.governor and not governor.allow(len(running))):
        for request in running:
            request.spec_token_ids = []
        return
    requests = [r for r in running
                if r.sampling.logprobs is None and r.grammar is None
                and r.num_tokens - r.num_computed_tokens == 1]
    ks = [draft_length(config.num_tokens, r.num_draft_tokens, r.num_accepted_draft_tokens,
                       len(running), config.saturation_tokens, r.num_steps_since_draft)
          for r in requests]
    for request, draft in zip(requests, proposer.propose(requests, ks)):
        request.spec_token_ids = draft
        request.num_steps_since_draft = 0 if draft else request.num_steps_since_draft + 1


class Proposer(Protocol):
    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[list[int]]:
        """Up to ks[i] draft tokens to follow requests[i]'s tokens (possibly none)."""

    def forget(self, request_id: str) -> None:
        """Drops what the proposer keeps for a request that ended."""

    def keep_only(self, running: Collection[str]) -> None:
        """Drops what it keeps for every request not in `running`."""


class NgramProposer:
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the longest
    suffix n-gram (min_n <= n <= max_n) of the request's prompt and output."""

    def __init__(self, min_n: int = 1, max_n: int = 3):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[list[int]]:
        return [self.propose_one(r, k) for r, k in zip(requests, ks, strict=True)]

    def propose_one(self, request: Request, k: int) -> list[int]:
        if k < 1:
            return []
        tokens = np.asarray(request.prompt_token_ids + request.output_token_ids, dtype=np.int64)
        return propose_ngram(tokens, k, self.min_n, self.max_n)

    def forget(self, request_id: str) -> None:
        """Keeps nothing per request."""

    def keep_only(self, running: Collection[str]) -> None:
        """Keeps nothing per request."""


def propose_ngram(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """The proposal for `tokens` (see NgramProposer): vectorised over positions, O(len * n)."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n:]
        # windows starting at 0 .. length - n - 1: every earlier occurrence, not the suffix itself
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = hits[-1] + n  # the most recent occurrence: what followed it
            return tokens[start:start + k].tolist()
    return []


class SpeculationGovernor:
    """Keeps speculation on only while it pays, as measured: the decode engine reports every
    step (its wall time from the start of the proposal before it, its tokens, whether drafts
    were scored) and asks before proposing whether this step may draft.

    Steps are grouped by batch size (powers of two); per group it keeps an exponential moving
    average of output tokens per second of steps with drafts and of steps without. The faster
    mode runs, and now and then (a probe) the other one, so both figures stay current: first
    after PROBE_EVERY steps, then, each time a probe confirms the loser, twice as long after
    (up to MAX_PROBE_INTERVAL steps), back to PROBE_EVERY when the loser wins. So where drafts
    do not pay (a small host-bound model whose verification step runs eagerly while plain decode
    replays a CUDA graph, a draft model too slow for its acceptance rate, a saturated batch),
    the cost is a probe step every few hundred steps, whatever `draft_length` estimates. The
    step time includes the proposer's own work (a draft model's passes), since it runs between
    steps."""

    EMA = 0.25  # weight of a new step in the averages

    def __init__(self) -> None:
        self._rates: dict[int, dict[bool, float]] = {}  # group -> speculated? -> tokens/s
        self._steps: dict[int, int] = {}  # group -> steps decided
        self._interval: dict[int, int] = {}  # group -> steps between probes
        self._last_probe: dict[int, int] = {}  # group -> the step of its last probe
        self._probing: set[int] = set()  # groups whose step now running is a probe
        self._winner: dict[int, bool] = {}  # group -> drafting won when last compared

    @staticmethod
    def group(batch_size: int) -> int:
        return max(batch_size, 1).bit_length()

    def allow(self, batch_size: int) -> bool:
        """Whether this step, of `batch_size` running requests, may draft."""
        group = self.group(batch_size)
        rates = self._rates.get(group, {})
        step = self._steps.get(group, 0)
        self._steps[group] = step + 1
        if True not in rates:
            return True
        best = rates[True] >= rates[False] if False in rates else True
        if step - self._last_probe.get(group, 0) < self._interval.get(group, PROBE_EVERY):
            return best
        self._last_probe[group] = step
        self._probing.add(group)
        return not best

    def observe(self, batch_size: int, speculated: bool, num_tokens: int, seconds: float) -> None:
        """One finished step: its mode, the tokens it produced, its wall time."""
        group = self.group(batch_size)
        probed = group in self._probing
        self._probing.discard(group)
        if seconds <= 0.0 or num_tokens <= 0:
            return
        rates = self._rates.setdefault(group, {})
        rate = num_tokens / seconds
        old = rates.get(speculated)
        rates[speculated] = rate if old is None else old + self.EMA * (rate - old)
        if len(rates) == 2:
            self._log_winner(group, rates)
        if probed and len(rates) == 2:
            lost = rates[speculated] < rates[not speculated]
            interval = self._interval.get(group, PROBE_EVERY)
            self._interval[group] = min(2 * interval, MAX_PROBE_INTERVAL) if lost else PROBE_EVERY

    def _log_winner(self, group: int, rates: dict[bool, float]) -> None:
        """Logs when a group's faster mode changes (first measured included)."""
        winner = rates[True] >= rates[False]
        if self._winner.get(group) == winner:
            return
        self._winner[group] = winner
        low, high = (1 << (group - 1), (1 << group) - 1) if group else (0, 0)
        logger.info("speculation %s for batches of %d-%d: %.0f tok/s with drafts, %.0f without",
                    "on" if winner else "off (probes only)", low, high, rates[True],
                    rates[False])

    def rates(self, batch_size: int) -> dict[bool, float]:
        return dict(self._rates.get(self.group(batch_size), {}))
