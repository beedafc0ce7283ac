"""A bounded load test of a real `tandem serve` (scripts/load_test.py, CI-sized: 16 clients for
20 s, 20% of the requests cancelled at a random point, mixed lengths): no request is lost, no
KV block is left held, and no process's memory trends upward after the warm-up. The 60-second,
32-client run is recorded in docs/benchmarks.md."""

from __future__ import annotations

import json
import sys

from tests.e2e.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import load_test  # noqa: E402


def test_load_loses_nothing_leaks_no_block_and_keeps_memory_flat(tiny_models, tmp_path):
    out = tmp_path / "load.json"
    code = load_test.main(["--model", str(tiny_models["llama"]), "--duration", "20",
                           "--concurrency", "16", "--max-prompt-words", "120",
                           "--serve-arg=--num-kv-blocks=512", "--output-json", str(out)])
    summary = json.loads(out.read_text())
    assert code == 0, summary["failures"]
    outcomes = summary["outcomes"]
    assert not any(k.startswith("lost") for k in outcomes)
    assert outcomes.get("cancelled", 0) > 0 and outcomes.get("finished:length", 0) > 0
    assert not any(summary["blocks_held_after"].values())
    assert set(summary["memory"]) >= {"gateway", "prefill", "decode"}
