"""Speculative decoding on the built-in pair (or any target and draft): output tokens/s with and
without speculation at several batch sizes, the acceptance rate and the mean accepted length,
for each proposer. The engine runs in-process (scheduler, runner, proposer: the decode tier's
step loop without its gRPC), prompts are Python source (the standard library's files, cut to
--prompt-len tokens), greedy or sampled, every request generating --output-len tokens.

    python3 scripts/bench_speculative.py --device cuda --batch-sizes 1 8 64 \\
        --methods none ngram draft --num-speculative-tokens 4 --output-json out.json

Every figure of one run comes from the same process and GPU; each method is warmed up once, then
the methods' measured runs are interleaved (--repeats rounds) and each reports its median run. Greedy outputs with and without
speculation are compared token for token (they must be equal: the run fails otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from decode_service.draft import build_draft_proposer  # noqa: E402
from decode_service.speculative import (SpeculationGovernor, SpeculativeConfig,  # noqa: E402
                                        propose_drafts)
from engine.bench import runtime  # noqa: E402
from engine.cli import resolve_dtype_flag  # noqa: E402
from engine.instance import InstanceConfig, build_engine_parts  # noqa: E402
from engine.model.checkpoint import builtin_draft_dir, builtin_model_dir  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402


def python_prompts(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens: the openings of the stdlib's files, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for path in sorted(root.glob("*.py")):
        ids = tokenizer.encode(path.read_text(errors="replace"))
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"only {len(prompts)} stdlib files of {length}+ tokens")


def run(parts, proposer, config: SpeculativeConfig | None, prompts: list[list[int]],
        output_len: int, temperature: float, governor: SpeculationGovernor) -> dict:
    """Generates output_len tokens for every prompt at once; the figures and the outputs.
    `governor` carries over between runs, as in a serving decode instance."""
    requests = [Request(f"r{i}", list(p), SamplingParams(
        max_tokens=output_len, temperature=temperature, seed=i, ignore_eos=True).validate())
        for i, p in enumerate(prompts)]
    for request in requests:
        parts.scheduler.add(request)
    drafted = accepted = steps = spec_steps = 0
    runtime.synchronize(parts.runner.device)
    started = proposed_at = time.perf_counter()
    while parts.scheduler.has_work():
        before = {r.request_id: (r.num_output_tokens, len(r.spec_token_ids))
                  for r in parts.scheduler.running}
        output, _ = runtime.step(parts)
        steps += 1
        gained_all = sum(r.num_output_tokens - before[r.request_id][0]
                         for r, _ in output.chunks if r.request_id in before)
        speculated = False
        for request in requests:
            out, num_spec = before.get(request.request_id, (None, 0))
            if num_spec:
                speculated = True
                drafted += num_spec
                gained = request.num_output_tokens - out
                accepted += max(gained - 1, 0)
                request.num_draft_tokens += num_spec
                request.num_accepted_draft_tokens += max(gained - 1, 0)
        spec_steps += speculated
        if config is not None and config.governor:  # as the decode engine does
            governor.observe(len(output.chunks), speculated, gained_all,
                             time.perf_counter() - proposed_at)
        if proposer is not None:
            proposed_at = time.perf_counter()
            propose_drafts(config, proposer, governor, parts.scheduler.running)
    runtime.synchronize(parts.runner.device)
    wall = time.perf_counter() - started
    if proposer is not None:
        proposer.keep_only(set())
    num_output = sum(r.num_output_tokens for r in requests)
    return {"output_tokens_per_s": num_output / wall, "wall_s": wall, "steps": steps,
            "num_output_tokens": num_output, "num_draft_tokens": drafted,
            "num_accepted_draft_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
            "steps_with_drafts": spec_steps,
            "tokens_per_step_per_request": num_output / steps / len(requests),
            "outputs": [r.output_token_ids for r in requests]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: the built-in target")
    p.add_argument("--draft-model", type=Path, default=None, help="default: the built-in draft")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--methods", nargs="+", default=["none", "ngram", "draft"])
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--governor", action=argparse.BooleanOptionalAction, default=True,
                   help="the decode tier's SpeculationGovernor (default: on, as served)")
    p.add_argument("--repeats", type=int, default=3,
                   help="measured runs of each method, interleaved with the other methods'; the "
                        "median one is reported (this tiny model's steps are host-bound, so "
                        "single runs vary by tens of %%)")
    p.add_argument("--output-json", type=Path, default=None)
    args = p.parse_args(argv)
    model = (args.model or builtin_model_dir()).resolve()
    draft_dir = (args.draft_model or builtin_draft_dir()).resolve()
    results = {"command": " ".join(["python3", "scripts/bench_speculative.py", *(argv or sys.argv[1:])]),
               "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "model": model.name, "draft": draft_dir.name,
               "runs": []}
    tokenizer = Tokenizer.from_dir(model)
    for batch in args.batch_sizes:
        prompts = python_prompts(tokenizer, batch, args.prompt_len)
        config = InstanceConfig(model_dir=model, served_model_name=model.name,
                                dtype=resolve_dtype_flag(args.dtype, model), device=args.device,
                                num_kv_blocks=batch * (args.prompt_len + args.output_len + 32) // 16 + 64,
                                max_num_batched_tokens=max(2048, batch * (args.num_speculative_tokens + 1)),
                                max_num_seqs=batch, enable_prefix_cache=False)
        parts = build_engine_parts(config, kv_from_remote=False,
                                   graph_query_lens=(1, args.num_speculative_tokens + 1))
        setups = {}  # method -> (spec, proposer, governor), each warmed up once
        for method in dict.fromkeys(args.methods):
            spec = proposer = None
            if method != "none":
                spec = SpeculativeConfig(method, args.num_speculative_tokens,
                                         draft_model=draft_dir if method == "draft" else None,
                                         governor=args.governor)
                proposer = (build_draft_proposer(config, draft_dir, parts.model_config.vocab_size,
                                                 parts.scheduler.pool.num_blocks,
                                                 parts.max_model_len,
                                                 args.num_speculative_tokens)
                            if method == "draft" else spec.ngram_proposer())
            setups[method] = (spec, proposer, SpeculationGovernor())
            # warm-up: the same workload once (Triton compiles each new shape on first use; the
            # governor learns what drafting is worth, as a serving instance does over time)
            run(parts, proposer, spec, prompts, args.output_len, args.temperature,
                setups[method][2])
        # measured runs interleaved (none, ngram, draft, none, ngram, ...), so that a drift of
        # the host's speed over the run weighs on every method alike
        measured: dict[str, list[dict]] = {method: [] for method in setups}
        for _ in range(args.repeats):
            for method, (spec, proposer, governor) in setups.items():
                measured[method].append(run(parts, proposer, spec, prompts, args.output_len,
                                            args.temperature, governor))
        plain = None
        for method, runs in measured.items():
            runs.sort(key=lambda r: r["output_tokens_per_s"])
            result = runs[len(runs) // 2]
            result["output_tokens_per_s_runs"] = [r["output_tokens_per_s"] for r in runs]
            outputs = result["outputs"]
            if any(r["outputs"] != outputs for r in runs) and args.temperature == 0.0:
                raise SystemExit(f"{method} at batch {batch}: greedy outputs differ between runs")
            for r in runs:
                del r["outputs"]
            if method == "none":
                plain = outputs
            elif plain is not None and args.temperature == 0.0:
                result["same_output_as_none"] = outputs == plain
            base = next((r for r in results["runs"]
                         if r["batch"] == batch and r["method"] == "none"), None)
            if base is not None and method != "none":
                result["speedup"] = result["output_tokens_per_s"] / base["output_tokens_per_s"]
            results["runs"].append({"batch": batch, "method": method, **result})
            print(json.dumps(results["runs"][-1]), flush=True)
        del parts
        torch.cuda.empty_cache() if args.device == "cuda" else None
    if args.output_json:
        args.output_json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
