"""An unsplit reference: one in-process engine (no gRPC, no transfer) that computes the prompt and
samples every token itself, stepping the real scheduler and model runner by hand:

    scheduler.schedule() -> runner.execute(output.chunks) -> scheduler.update_from_output(...)

The split system (prefill samples the first token, decode the rest over transferred KV) must
produce what this produces for the same model, dtype, prompt and sampling parameters.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from engine.instance import EngineParts, build_engine_parts
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from tests.services.conftest import config_for


def sampled_tokens(execute_result) -> dict[str, int]:
    """request_id -> sampled token out of what `ModelRunner.execute` returns (a StepResult:
    sampled, failed, logprobs); the one place that knows that shape. A failed row fails the
    reference."""
    if execute_result.failed:
        raise RuntimeError(f"reference engine: {execute_result.failed}")
    return execute_result.sampled


def build_reference(model_dir: Path, **config) -> EngineParts:
    """Engine parts of one unsplit engine (its own KV, prefix cache on), as the tiers build them."""
    config.setdefault("num_kv_blocks", 64)
    return build_engine_parts(config_for(model_dir, **config), kv_from_remote=False)


def generate(parts: EngineParts, prompt_ids: list[int], sampling: SamplingParams,
             request_id: str = "reference") -> list[int]:
    """Runs one request to its end on `parts` and returns its output tokens; frees its blocks."""
    scheduler, runner = parts.scheduler, parts.runner
    request = Request(request_id, list(prompt_ids), sampling.validate())
    scheduler.add(request)
    try:
        for _ in range(len(prompt_ids) + sampling.max_tokens + 1):  # a bound, not a timeout
            output = scheduler.schedule()
            sampled = sampled_tokens(runner.execute(output.chunks))
            scheduler.update_from_output(output, sampled)
            if request.status.finished:
                return list(request.output_token_ids)
        raise RuntimeError(f"reference request did not finish: {request.status}")
    finally:
        if not request.status.finished:
            scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        if request.block_ids:
            scheduler.free_blocks(request)


@contextlib.contextmanager
def recorded_logits(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Records every row of logits `model.compute_logits` returns (one row per sampled token, in
    order) while the block is active. Observes the real model; changes nothing it computes."""
    rows: list[torch.Tensor] = []
    real = model.compute_logits

    def compute_logits(hidden):
        logits = real(hidden)
        rows.extend(logits.detach().float().cpu().clone())
        return logits

    model.compute_logits = compute_logits
    try:
        yield rows
    finally:
        del model.compute_logits  # back to the class's method
