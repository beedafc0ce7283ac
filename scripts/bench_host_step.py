"""CPU micro-benchmark of the host work of a decode step (no model; the prompts run as prefills first, untimed): Scheduler.schedule,
StepBuffers.fill and Scheduler.update_from_output, for a batch of decoding requests.

    python3 scripts/bench_host_step.py --batch-size 256 --context 512 --steps 200
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python3 scripts/bench_host_step.py`
    sys.path.insert(0, str(REPO_ROOT))

from engine.block_pool import BlockPool  # noqa: E402
from engine.model_runner import RunnerConfig, StepBuffers  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    max_model_len = args.context + args.steps + 64
    blocks_per_seq = -(-max_model_len // args.block_size)
    pool = BlockPool(args.batch_size * blocks_per_seq + 16)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=max(2048, args.batch_size),
                                          max_num_seqs=args.batch_size,
                                          block_size=args.block_size,
                                          max_model_len=max_model_len),
                          pool, frozenset({0}))
    buffers = StepBuffers(RunnerConfig(block_size=args.block_size, max_num_seqs=args.batch_size,
                                       max_num_tokens=max(2048, args.batch_size),
                                       max_model_len=max_model_len), torch.device("cpu"))
    rng = random.Random(0)
    for i in range(args.batch_size):
        scheduler.add(Request(f"r{i}", [rng.randrange(1, 32000) for _ in range(args.context)],
                              SamplingParams(max_tokens=args.steps + 10, ignore_eos=True)))
    while True:  # the prompts run as chunked prefills (their blocks enter the prefix cache)
        output = scheduler.schedule()
        scheduler.update_from_output(output, {r.request_id: rng.randrange(1, 32000)
                                              for r, n in output.chunks
                                              if r.num_computed_tokens + n == r.num_tokens})
        if all(n == 1 for _, n in output.chunks) and len(output.chunks) == args.batch_size:
            break
    times = {"schedule": 0.0, "fill": 0.0, "update": 0.0}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        output = scheduler.schedule()
        t1 = time.perf_counter()
        buffers.fill(output.chunks, args.block_size, args.batch_size, args.batch_size)
        t2 = time.perf_counter()
        sampled = {r.request_id: rng.randrange(1, 32000) for r, _ in output.chunks}
        t3 = time.perf_counter()
        scheduler.update_from_output(output, sampled)
        t4 = time.perf_counter()
        times["schedule"] += t1 - t0
        times["fill"] += t2 - t1
        times["update"] += t4 - t3
    total = sum(times.values())
    print(f"batch {args.batch_size}, context {args.context}, {args.steps} steps, ms per step: "
          + ", ".join(f"{k} {v / args.steps * 1e3:.3f}" for k, v in times.items())
          + f", total {total / args.steps * 1e3:.3f}")


if __name__ == "__main__":
    main()
