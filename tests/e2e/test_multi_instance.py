"""`tandem serve --prefill-workers 2 --decode-workers 2`: the gateway spreads requests over every
instance of each tier, output stays exact, and every pool ends free."""

from __future__ import annotations

import concurrent.futures
import re
import time

import openai
from transformers import AutoTokenizer

from tests.reference import hf_greedy

ROUTE = re.compile(r"decode=(\S+) prefill=(\S+)")


def test_requests_spread_over_instances(tiny_models, serve_model):
    model_dir = tiny_models["qwen3"]
    served = serve_model(model_dir, "--prefill-workers", "2", "--decode-workers", "2")
    assert len(served.prefill) == 2 and len(served.decode) == 2
    client = openai.OpenAI(base_url=served.base_url, api_key="x", max_retries=0, timeout=120)
    prompts = [[30 + i, 31, 32, 33 + i] for i in range(8)]

    def complete(prompt):
        return client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=24,
                                         temperature=0)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(complete, prompts))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for prompt, result in zip(prompts, results):
        ids = hf_greedy(model_dir, prompt, 24)
        assert result.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True)
        assert result.usage.completion_tokens == len(ids)
    served.assert_all_blocks_free()
    routes = logged_routes(served, 8)
    assert {d for d, _ in routes} == set(served.decode)
    assert {p for _, p in routes} == set(served.prefill)


def logged_routes(served, count: int, timeout: float = 60.0) -> list[tuple[str, str]]:
    """(decode, prefill) of the gateway's per-request log lines, once `count` have been logged
    (the gateway logs a request as it closes it, which may follow the response); the deadline
    is a hang guard."""
    deadline = time.monotonic() + timeout
    while True:
        routes = [m.groups() for m in map(ROUTE.search, list(served.output)) if m]
        if len(routes) >= count:
            assert len(routes) == count, routes
            return routes
        assert time.monotonic() < deadline, f"{len(routes)} of {count} requests logged"
        time.sleep(0.05)
