"""transformers `generate()` on the same weight tensors, prompts and device as the Tandem run.

The transformers model is built from the checkpoint's config.json and then given Tandem's own
parameter tensors (`load_state_dict(..., assign=True)` of `CausalLM.checkpoint_tensors()`: the
Hugging Face names, fused projections split back into views), so both runs use the very same
weights, dummy or real, with no second copy kept.
transformers runs its default attention implementation and dynamic KV cache, no compilation.

offline: requests go in batches of `batch_size`, in workload order; each batch is left-padded
to its longest prompt and generates its longest requested output (min_new_tokens = max_new_
tokens, so no row stops early), as vLLM's `benchmark_throughput --backend hf` does. Only the
requested tokens count as output, so both engines are credited with the same workload.

latency: one generate() over the same prompts, 1 + warmup_steps + steps new tokens; a streamer
notes the time (device synchronised) at which each step's tokens exist; a decode step is the gap
between two such times, and ms/step is the median of the `steps` gaps after the prefill and the
warm-up steps: the same statistic as Tandem's.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

from engine.bench import report, runtime
from engine.bench.datasets import BenchRequest, Workload

PAD_TOKEN_ID = 0  # any id: padded positions are masked out


def check_available() -> None:
    """Raises ValueError when transformers is missing (call before the Tandem run)."""
    if importlib.util.find_spec("transformers") is None:
        raise ValueError("--compare-transformers needs transformers: pip install transformers")


def transformers_model(model: torch.nn.Module, model_dir: Path) -> torch.nn.Module:
    """An AutoModelForCausalLM of `model_dir`'s config holding `model`'s parameter tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    weight = next(model.parameters())
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(weight.device):
        hf = AutoModelForCausalLM.from_config(config, dtype=weight.dtype)
    hf.load_state_dict(model.checkpoint_tensors(), strict=True, assign=True)
    return hf.eval().requires_grad_(False)


def offline(model: torch.nn.Module, model_dir: Path, workload: Workload, batch_size: int,
            temperature: float) -> dict[str, Any]:
    """Runs the workload through generate() in batches; the measured throughput figures."""
    hf = transformers_model(model, model_dir)
    device = next(hf.parameters()).device
    _generate(hf, workload.requests[:1], 2, temperature)  # warm-up: first-call costs
    generated = 0
    batches = [workload.requests[i:i + batch_size]
               for i in range(0, len(workload.requests), batch_size)]
    with report.Progress(len(workload.requests), "transformers offline") as progress:
        runtime.synchronize(device)
        started = time.perf_counter()
        for batch in batches:
            max_new = max(r.output_len for r in batch)
            generated += len(batch) * _generate(hf, batch, max_new, temperature)
            progress.update(len(batch))
        runtime.synchronize(device)
        wall_s = time.perf_counter() - started
    num_input, num_output = workload.num_input_tokens, workload.num_output_tokens
    return {"engine": "transformers", "wall_s": wall_s, "num_requests": len(workload.requests),
            "num_input_tokens": num_input, "num_output_tokens": num_output,
            "requests_per_s": len(workload.requests) / wall_s,
            "output_tokens_per_s": num_output / wall_s,
            "total_tokens_per_s": (num_input + num_output) / wall_s,
            "batch_size": batch_size, "num_batches": len(batches),
            "num_generated_tokens": generated, "attn_implementation": _attention(hf)}


def decode_ms_per_step(hf: torch.nn.Module, prompts: list[list[int]], steps: int,
                       warmup_steps: int, temperature: float) -> float:
    """Median ms of the `steps` decode steps after the prefill and `warmup_steps` steps."""
    clock = _StepClock(next(hf.parameters()).device)
    _generate(hf, [BenchRequest(p, 1) for p in prompts], 1 + warmup_steps + steps, temperature,
              streamer=clock)
    # times: prompt handed over, first token (prefill), then one per decode step
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
    if len(gaps) != warmup_steps + steps:
        raise RuntimeError(f"generate() reported {len(gaps)} decode steps, not "
                           f"{warmup_steps + steps}")
    return median(gaps[warmup_steps:]) * 1e3


class _StepClock:
    """A generate() streamer that only notes when each put() happens: once with the prompt,
    then once a step with that step's tokens (after a device synchronisation)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        runtime.synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def _generate(hf: torch.nn.Module, requests: list[BenchRequest], max_new: int,
              temperature: float, streamer: _StepClock | None = None) -> int:
    """generate() over the left-padded prompts, exactly `max_new` tokens a row. Returns the
    number of tokens each row generated (checked to be max_new)."""
    device = next(hf.parameters()).device
    width = max(len(r.prompt_token_ids) for r in requests)
    ids = torch.full((len(requests), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, request in enumerate(requests):
        n = len(request.prompt_token_ids)
        ids[row, width - n:] = torch.tensor(request.prompt_token_ids)
        mask[row, width - n:] = 1
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if temperature > 0 else {"do_sample": False})
    out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                      max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=PAD_TOKEN_ID,
                      streamer=streamer, **sampling)
    num_generated = out.shape[1] - width
    if num_generated != max_new:
        raise RuntimeError(f"transformers generated {num_generated} tokens, not {max_new}")
    return num_generated


def _attention(hf: torch.nn.Module) -> str | None:
    return getattr(hf.config, "_attn_implementation", None)
