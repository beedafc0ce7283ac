"""`tandem serve`: one scrape of the gateway's /metrics sees the whole system, the gateway's own
metrics and every instance's samples labelled with its tier and address."""

from __future__ import annotations

import collections
import re
import time
import urllib.request
from pathlib import Path

import openai
from prometheus_client.parser import text_string_to_metric_families

HANG_GUARD_S = 30.0
DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "tandem.json"


def scrape(served) -> list:
    """The metric families of the gateway's /metrics, each once (the text format allows no
    repeat)."""
    url = f"http://127.0.0.1:{served.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=HANG_GUARD_S) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    names = collections.Counter(f.name for f in families)
    assert not [n for n, count in names.items() if count > 1], names
    return families


def names_of(families: list) -> set[str]:
    """Every name a query can use: families (counters with _total) and samples."""
    return ({f.name + ("_total" if f.type == "counter" else "") for f in families}
            | {s.name for f in families for s in f.samples})


def total(samples: list, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(s.value for s in samples
               if s.name == name and labels.items() <= s.labels.items())


def test_the_gateway_exposes_its_own_and_every_instances_metrics(tiny_models, serve_model):
    model_dir = tiny_models["llama"]
    served = serve_model(model_dir)
    client = openai.OpenAI(base_url=served.base_url, api_key="x", max_retries=0, timeout=60)
    results = [client.completions.create(model=model_dir.name, prompt=[40 + i, 41, 42],
                                         max_tokens=5, temperature=0) for i in range(2)]
    completion_tokens = sum(r.usage.completion_tokens for r in results)
    instances = [("prefill", a) for a in served.prefill] + [("decode", a) for a in served.decode]

    deadline = time.monotonic() + HANG_GUARD_S
    while True:  # the prefill tier frees its blocks just after the answer
        families = scrape(served)
        samples = [s for family in families for s in family.samples]
        usage = [total(samples, "tandem:kv_cache_usage_perc", tier=t, instance=a)
                 for t, a in instances]
        if not any(usage):
            break
        assert time.monotonic() < deadline, f"KV cache usage stayed at {usage}"
        time.sleep(0.05)

    gateway = {"tier": "gateway"}
    assert total(samples, "tandem:request_success_total", **gateway) == 2
    assert total(samples, "tandem:generation_tokens_total", **gateway) == completion_tokens
    assert total(samples, "tandem:time_to_first_token_seconds_count", **gateway) == 2
    assert total(samples, "tandem:e2e_request_latency_seconds_count", **gateway) == 2
    assert total(samples, "tandem:num_requests_running", **gateway) == 0
    for tier, address in instances:
        labels = {"tier": tier, "instance": address}
        assert total(samples, "tandem:instance_up", **labels) == 1
        assert total(samples, "tandem:request_success_total", **labels) == 2
    decode = {"tier": "decode", "instance": served.decode[0]}
    assert total(samples, "tandem:generation_tokens_total", **decode) == completion_tokens
    assert total(samples, "tandem:prompt_tokens_total", **decode) == 6
    assert total(samples, "tandem:kv_transfer_bytes_total", **decode) > 0
    # the dashboard asks for nothing the system does not expose
    assert set(re.findall(r"tandem:\w+", DASHBOARD.read_text())) <= names_of(families)
