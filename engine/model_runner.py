"""Runs one scheduled step through the model: builds the flat batch, attention metadata, logits,
and samples for every request whose chunk reaches its last token."""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.attention import AttentionMetadata
from engine.sampler import SamplingError, sample
from engine.scheduler import ScheduledChunk


class StepResult(NamedTuple):
    """What one step produced: request_id -> sampled token, and request_id -> why sampling
    failed for the requests whose row could not be sampled (only those fail)."""

    sampled: dict[str, int]
    failed: dict[str, str]


class ModelRunner:
    """Owns the model and the KV cache tensor. Called from the engine thread only."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int,
                 device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device

    def prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor,
                                                             AttentionMetadata]:
        """Flat input ids, positions and attention metadata for the step."""
        input_ids, positions, slots, seq_lens, starts = [], [], [], [], [0]
        for request, num_tokens in chunks:
            start = request.num_computed_tokens
            end = start + num_tokens
            input_ids += request.token_ids(start, end)
            positions += range(start, end)
            slots += (request.slot(p, self.block_size) for p in range(start, end))
            seq_lens.append(end)
            starts.append(starts[-1] + num_tokens)
        max_blocks = max(len(r.block_ids) for r, _ in chunks)
        table = [r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r, _ in chunks]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_tables=torch.tensor(table, dtype=torch.int32, device=self.device),
            seq_lens=seq_lens, query_start_loc=starts)
        return (torch.tensor(input_ids, dtype=torch.long, device=self.device),
                torch.tensor(positions, dtype=torch.long, device=self.device), meta)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> StepResult:
        """Runs the step; samples a token for each chunk that ends its sequence."""
        if not chunks:
            return StepResult({}, {})
        input_ids, positions, meta = self.prepare(chunks)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        rows, sampling = [], []
        for i, (request, num_tokens) in enumerate(chunks):
            if request.num_computed_tokens + num_tokens == request.num_tokens:
                rows.append(meta.query_start_loc[i + 1] - 1)
                sampling.append(request)
        if not rows:
            return StepResult({}, {})
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        result = StepResult({}, {})
        for request, token in zip(sampling, sample(logits, sampling)):
            if isinstance(token, SamplingError):
                result.failed[request.request_id] = f"sampling failed: {token}"
            else:
                result.sampled[request.request_id] = token
        return result
