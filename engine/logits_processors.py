"""The logits processors that run before the sampler picks a token (engine/sampler.py documents
the whole order): logit_bias, the min_tokens mask, then the repetition, frequency and presence
penalties, as vLLM. They change only the rows of requests that use them, on the logits' device,
with batched ops over those rows; a batch where no request uses one never builds this.

    logit_bias    logits[t] += bias[t]                         (OpenAI; before anything else)
    min_tokens    logits[t] = -inf for t in stop_token_ids, and EOS unless ignore_eos, while
                  the request has fewer than min_tokens output tokens (vLLM masks them too)
    repetition    t in prompt or output: logits[t] / p if logits[t] > 0 else logits[t] * p
                  (transformers' RepetitionPenaltyLogitsProcessor, vLLM)
    frequency     logits[t] -= f * count[t]        count: t's occurrences in the output so far
    presence      logits[t] -= p * (count[t] > 0)

Per call: ONE int64 and ONE float32 tensor go host -> device for the processed rows (bias and
mask entries, per-row penalties, and the token lists padded with the id `vocab`); the per-row
token counts come from one scatter_add of the padded output ids into [rows, vocab + 1] (the
padding column is dropped), the prompt's presence from one scatter. No loop touches the
vocabulary; the host work is O(prompt + output) per penalised row (later: persistent
per-request device buffers, as vLLM keeps the prompt's).
"""

from __future__ import annotations

from typing import AbstractSet

import numpy as np
import torch

from engine.request import Request


def stop_ids_to_mask(request: Request, eos_token_ids: AbstractSet[int]) -> set[int]:
    """The ids that would end the request although it has fewer than min_tokens output tokens
    (none once it has them): its stop_token_ids, and EOS unless ignore_eos or the request has
    a grammar (its grammar allows EOS only once complete, and then often nothing else)."""
    params = request.sampling
    if request.num_output_tokens >= params.min_tokens:
        return set()
    keep_eos = params.ignore_eos or request.grammar is not None
    return set(params.stop_token_ids) | (set() if keep_eos else set(eos_token_ids))


def uses_processors(request: Request, eos_token_ids: AbstractSet[int]) -> bool:
    params = request.sampling
    return bool(params.logit_bias or params.has_penalties
                or stop_ids_to_mask(request, eos_token_ids))


def bias_error(request: Request, vocab: int) -> str | None:
    """Why the request's logit_bias cannot apply to logits of `vocab` tokens, or None."""
    bad = [t for t, _ in request.sampling.logit_bias if not 0 <= t < vocab]
    return f"logit_bias names token id {bad[0]}, outside the vocabulary [0, {vocab})" if bad \
        else None


def _entries(chosen: list[Request], vocab: int,
             eos_token_ids: AbstractSet[int]) -> list[tuple[int, int, float]]:
    """(row, token id, value to add) of every logit_bias entry and every masked id (-inf)."""
    entries = [(i, t, b) for i, r in enumerate(chosen) for t, b in r.sampling.logit_bias]
    return entries + [(i, t, float("-inf")) for i, r in enumerate(chosen)
                      for t in sorted(stop_ids_to_mask(r, eos_token_ids)) if 0 <= t < vocab]


def _padded_ids(chosen: list[Request], vocab: int) -> tuple[np.ndarray, int]:
    """([rows, P + O] int64, P): the prompt of each row with a repetition penalty in the first P
    columns, the output of each row with any penalty in the last O; padding is `vocab` (a
    column the scatter writes and the penalties drop)."""
    repeated = [r.sampling.repetition_penalty != 1.0 for r in chosen]
    penalised = [r.sampling.has_penalties for r in chosen]
    num_prompt = max((r.num_prompt_tokens for r, on in zip(chosen, repeated) if on), default=0)
    num_output = max((r.num_output_tokens for r, on in zip(chosen, penalised) if on), default=0)
    ids = np.full((len(chosen), num_prompt + num_output), vocab, dtype=np.int64)
    for i, request in enumerate(chosen):
        if repeated[i]:
            ids[i, :request.num_prompt_tokens] = request.prompt_token_ids
        if penalised[i]:
            ids[i, num_prompt:num_prompt + request.num_output_tokens] = request.output_token_ids
    return ids, num_prompt


class LogitsProcessors:
    """The processors of some rows of one batch, built on the host, applied with `apply`."""

    def __init__(self, rows: list[int], requests: list[Request], vocab: int,
                 eos_token_ids: AbstractSet[int], device: torch.device):
        chosen = [requests[row] for row in rows]
        entries = _entries(chosen, vocab, eos_token_ids)
        ids, self.num_prompt = _padded_ids(chosen, vocab)
        bias_rows, bias_ids, biases = zip(*entries) if entries else ((), (), ())
        ints = np.concatenate([np.asarray(rows, np.int64), np.asarray(bias_rows, np.int64),
                               np.asarray(bias_ids, np.int64), ids.ravel()])
        floats = np.array([[r.sampling.repetition_penalty, r.sampling.frequency_penalty,
                            r.sampling.presence_penalty] for r in chosen], np.float32)
        floats = np.concatenate([floats.T.ravel(), np.asarray(biases, np.float32)])
        ints_t, floats_t = (torch.from_numpy(a).to(device) for a in (ints, floats))  # 2 copies
        count, num_bias = len(rows), len(entries)
        self.index, self.bias_rows, self.bias_ids, ids_t = ints_t.split(
            [count, num_bias, num_bias, ids.size])
        self.ids = ids_t.view(ids.shape)
        self.repetition, self.frequency, self.presence, self.biases = floats_t.split(
            [count, count, count, num_bias])
        self.use_repetition = any(r.sampling.repetition_penalty != 1.0 for r in chosen)
        self.use_additive = any(r.sampling.presence_penalty or r.sampling.frequency_penalty
                                for r in chosen)
        self.all_rows = len(rows) == len(requests)
        self.vocab = vocab

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits ([N, vocab] float32) with these rows processed: a new tensor (the input is
        left as it was)."""
        rows = logits.clone() if self.all_rows else logits.index_select(0, self.index)
        if self.biases.numel():
            rows.index_put_((self.bias_rows, self.bias_ids), self.biases, accumulate=True)
        if self.ids.shape[1]:  # some penalised row has tokens to penalise
            self._penalise(rows)
        return rows if self.all_rows else logits.index_copy(0, self.index, rows)

    def _penalise(self, rows: torch.Tensor) -> None:
        """The penalties, in place, in vLLM's order (repetition, frequency, presence)."""
        shape = (rows.shape[0], self.vocab + 1)  # + the padding column
        output = self.ids[:, self.num_prompt:]
        counts = rows.new_zeros(shape).scatter_add_(
            1, output, torch.ones_like(output, dtype=rows.dtype))[:, :self.vocab]
        if self.use_repetition:
            seen = torch.zeros(shape, dtype=torch.bool, device=rows.device).scatter_(
                1, self.ids[:, :self.num_prompt], True)[:, :self.vocab]
            seen |= counts > 0
            penalty = self.repetition[:, None]
            penalised = torch.where(rows > 0, rows / penalty, rows * penalty)
            rows.copy_(torch.where(seen, penalised, rows))
        if self.use_additive:
            rows.sub_(self.frequency[:, None] * counts)
            rows.sub_(self.presence[:, None] * (counts > 0))
