"""`tandem bench`: workloads, the roofline arithmetic, the serve metrics' definitions, and each
mode run end to end on the tiny models (offline and latency in this process; serve against
`tandem serve` as real processes)."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bench import datasets, report, serve
from engine.cli import build_parser
from engine.cli import main as tandem_main

ROOT = Path(__file__).resolve().parents[2]


def bench(tmp_path: Path, *argv: str) -> dict:
    """Runs `tandem bench ...` in this process and returns the JSON it wrote."""
    out = tmp_path / "bench.json"
    assert tandem_main(["bench", *argv, "--output-json", str(out)]) == 0
    return json.loads(out.read_text())


# workloads
def test_random_workload_is_deterministic_and_within_bounds():
    first = datasets.random_workload(64, 500, seed=3, input_len=(5, 9), output_len=(2, 4))
    again = datasets.random_workload(64, 500, seed=3, input_len=(5, 9), output_len=(2, 4))
    other = datasets.random_workload(64, 500, seed=4, input_len=(5, 9), output_len=(2, 4))
    assert first == again and first.requests != other.requests
    assert {len(r.prompt_token_ids) for r in first.requests} == set(range(5, 10))
    assert {r.output_len for r in first.requests} == {2, 3, 4}
    assert all(0 <= t < 500 for r in first.requests for t in r.prompt_token_ids)
    assert first.describe()["num_output_tokens"] == sum(r.output_len for r in first.requests)


def test_sharegpt_shaped_workload_has_sharegpt_means():
    workload = datasets.sharegpt_shaped_workload(1000, 32000, seed=0)
    assert workload == datasets.sharegpt_shaped_workload(1000, 32000, seed=0)
    stats = workload.describe()
    for side, target in (("input_len", datasets.SHAREGPT_MEAN_INPUT_LEN),
                         ("output_len", datasets.SHAREGPT_MEAN_OUTPUT_LEN)):
        assert stats[side]["min"] >= 4 and stats[side]["max"] <= 1024
        assert abs(stats[side]["mean"] - target) < 0.1 * target  # sampling noise at n = 1000
        assert stats[side]["median"] < stats[side]["mean"]  # right-skewed, as ShareGPT is


def test_truncated_lognormal_mean_is_solved_exactly():
    mu = datasets._fit_mu(217.0, 1.0, 4, 1024)
    assert datasets._truncated_lognormal_mean(mu, 1.0, 4, 1024) == pytest.approx(217.0)


def test_workloads_longer_than_the_context_are_refused():
    with pytest.raises(ValueError, match="1500-token requests"):
        datasets.build_workload("random", 4, 100, 0, max_model_len=1024, input_len=(1, 1000),
                                output_len=(1, 500))
    with pytest.raises(ValueError, match="2048-token"):
        datasets.build_workload("sharegpt-shaped", 4, 100, 0, max_model_len=1024)


def test_warmup_prompts_are_shaped_like_the_workload_but_fresh():
    workload = datasets.random_workload(4, 1000, seed=0, input_len=(20, 40), output_len=(9, 9))
    warmup = datasets.warmup_requests(workload, 2, 4, 1000)
    assert [len(w.prompt_token_ids) for w in warmup] == \
        [len(r.prompt_token_ids) for r in workload.requests[:2]]
    assert all(w.output_len == 4 for w in warmup)
    assert all(w.prompt_token_ids[:16] != r.prompt_token_ids[:16]
               for w, r in zip(warmup, workload.requests))


# roofline arithmetic (tiny models: hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128)
def test_decode_weight_and_kv_bytes_match_hand_counts(tiny_models):
    from engine.bench import latency, runtime
    from engine.kv_cache import KVLayout

    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k+v, o, MLP, norms
    for arch, tied, qkv_bias in (("llama", False, 0), ("qwen2", True, 64 + 32 + 32)):
        model = runtime.meta_model(tiny_models[arch], "float32")
        vocab = json.loads((tiny_models[arch] / "config.json").read_text())["vocab_size"]
        body = 2 * (layer + qkv_bias) + 64  # layers and the final norm
        for batch in (1, 8):
            # untied: the LM head is read whole, the embedding only for the batch's rows
            expected = body + vocab * 64 + (0 if tied else batch * 64)
            assert latency.decode_weight_bytes(model, batch) == 4 * expected, (arch, batch)
    layout = KVLayout("float32", block_size=16, num_layers=2, num_kv_heads=2, head_dim=16)
    assert latency.kv_bytes_per_token(layout) == 2 * 2 * 2 * 16 * 4  # K+V, layers, heads, dim


def test_roofline_is_bytes_over_bandwidth(tiny_models):
    from engine.bench import latency, runtime
    from engine.kv_cache import KVLayout

    model = runtime.meta_model(tiny_models["llama"], "float32")
    layout = KVLayout("float32", block_size=16, num_layers=2, num_kv_heads=2, head_dim=16)
    row = latency.roofline(model, layout, batch_size=2, kv_tokens_per_step=100, bandwidth=1e9,
                           measured_ms=2.0)
    weight = latency.decode_weight_bytes(model, 2)
    assert row["bytes_per_step"] == weight + 100 * 512
    assert row["roofline_ms"] == pytest.approx((weight + 100 * 512) / 1e9 * 1e3)
    assert row["fraction_of_roofline"] == pytest.approx(row["roofline_ms"] / 2.0)


# offline
def test_offline_runs_the_workload_and_reports_its_throughput(tmp_path, tiny_models):
    payload = bench(tmp_path, "offline", "--model", str(tiny_models["llama"]), "--device", "cpu",
                    "--num-prompts", "8", "--random-input-len", "8", "40",
                    "--random-output-len", "4", "16")
    assert set(payload) == {"mode", "environment", "engine", "dataset", "sampling", "results"}
    results, dataset = payload["results"], payload["dataset"]
    assert results["num_requests"] == dataset["num_requests"] == 8
    assert results["num_output_tokens"] == dataset["num_output_tokens"]  # EOS ignored
    assert results["num_input_tokens"] == dataset["num_input_tokens"]
    wall = results["wall_s"]
    assert results["requests_per_s"] == pytest.approx(8 / wall)
    assert results["total_tokens_per_s"] == pytest.approx(
        (dataset["num_input_tokens"] + dataset["num_output_tokens"]) / wall)
    assert results["num_steps"] >= dataset["output_len"]["max"]
    assert 1 <= results["mean_batch_size"] <= 8
    env = payload["environment"]
    assert env["command"].startswith("tandem ") and env["device"] == "cpu"
    assert env["versions"]["torch"] and env["date_utc"]
    assert payload["engine"]["model"] == "llama" and payload["engine"]["dtype"] == "float32"


def test_offline_run_frees_every_block(tiny_models):
    from engine.bench import offline, runtime

    spec = runtime.EngineSpec(
        model_dir=tiny_models["llama"], load_format="auto", dtype="float32", device="cpu",
        attention_backend="auto", block_size=16, max_num_seqs=4, max_num_batched_tokens=64,
        max_model_len=None, num_kv_blocks=64, kv_cache_memory=None, gpu_memory_utilization=0.85)
    parts = runtime.build_engine(spec)
    workload = datasets.random_workload(6, 100, 0, (10, 30), (3, 9))
    results = offline.run_requests(parts, workload.requests, temperature=0.0)
    assert results["num_output_tokens"] == workload.num_output_tokens
    pool = parts.scheduler.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert not parts.scheduler.has_work()


def test_offline_compare_transformers_counts_the_same_tokens(tmp_path, tiny_models):
    pytest.importorskip("transformers")
    payload = bench(tmp_path, "offline", "--model", str(tiny_models["qwen2"]), "--device", "cpu",
                    "--num-prompts", "5", "--random-input-len", "8", "24",
                    "--random-output-len", "3", "9", "--temperature", "0",
                    "--compare-transformers", "--hf-batch-size", "2")
    ours, theirs = payload["results"], payload["transformers"]
    assert theirs["num_output_tokens"] == ours["num_output_tokens"] \
        == payload["dataset"]["num_output_tokens"]
    assert theirs["num_batches"] == 3  # 5 requests, 2 a batch
    assert theirs["num_generated_tokens"] >= ours["num_output_tokens"]  # batches run to the longest
    assert payload["speedup_vs_transformers"] == pytest.approx(ours["output_tokens_per_s"]
                                             / theirs["output_tokens_per_s"])


def test_transformers_model_holds_the_same_weight_tensors(tiny_models):
    pytest.importorskip("transformers")
    from engine.bench import hf_compare
    from engine.model import load_model

    ours, _ = load_model(tiny_models["qwen2"], dtype="float32")
    hf = hf_compare.transformers_model(ours, tiny_models["qwen2"])
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    for name, tensor in ours.named_parameters(remove_duplicate=False):
        assert theirs[name].data_ptr() == tensor.data_ptr(), name


# latency
def test_latency_sweep_measures_decode_steps_and_their_roofline(tmp_path, tiny_models):
    pytest.importorskip("transformers")
    payload = bench(tmp_path, "latency", "--model", str(tiny_models["llama"]), "--device", "cpu",
                    "--batch-sizes", "1", "2", "--context-len", "16", "--steps", "3",
                    "--warmup-steps", "1", "--compare-transformers")
    assert payload["copy_bandwidth"]["bytes_per_s"] > 0
    assert [r["batch_size"] for r in payload["rows"]] == [1, 2]
    for row in payload["rows"]:
        batch = row["batch_size"]
        assert row["tokens_per_s"] == pytest.approx(batch / (row["ms_per_step"] / 1e3))
        # prompt 16, then 1 warm-up step: the timed steps' sequences hold 18, 19, 20 tokens
        assert row["mean_seq_len"] == 19 and row["kv_tokens_per_step"] == 19 * batch
        assert row["kv_bytes"] == 19 * batch * payload["kv_bytes_per_token"]
        assert row["roofline_ms"] == pytest.approx(
            row["bytes_per_step"] / payload["copy_bandwidth"]["bytes_per_s"] * 1e3)
        assert row["fraction_of_roofline"] == pytest.approx(row["roofline_ms"] / row["ms_per_step"])
        assert row["transformers_ms_per_step"] > 0
        assert row["speedup_vs_transformers"] == pytest.approx(
            row["transformers_ms_per_step"] / row["ms_per_step"])


# serve: metric definitions
def test_request_result_times_chunks_as_vllm():
    result = serve.RequestResult(input_len=4)
    for _ in range(3):
        result.chunk(2)
    result.end(completion_tokens=6)
    assert result.error is None and result.output_len == 6 and len(result.itl_s) == 2
    assert 0 < result.ttft_s <= result.e2el_s
    assert result.e2el_s - result.ttft_s == pytest.approx(sum(result.itl_s))
    result.end(completion_tokens=7)
    assert "usage reports 7" in result.error
    empty = serve.RequestResult(input_len=4)
    empty.end(completion_tokens=None)
    assert empty.error == "the stream carried no tokens"


def test_summary_follows_vllm_definitions():
    results = [serve.RequestResult(10, 5, ttft_s=0.1, e2el_s=0.5, itl_s=[0.1] * 4),
               serve.RequestResult(20, 1, ttft_s=0.3, e2el_s=0.3),  # one token: TPOT 0
               serve.RequestResult(30, error="UNAVAILABLE: down")]
    summary = serve.summarize(results, duration_s=2.0, slo_ms={"ttft": 200, "tpot": 150})
    assert (summary["completed"], summary["failed"]) == (2, 1)
    assert summary["errors"] == ["UNAVAILABLE: down"]
    assert summary["request_throughput"] == 1.0
    assert summary["output_throughput"] == 3.0 and summary["total_token_throughput"] == 18.0
    assert summary["tpot_ms_p50"] == pytest.approx(100.0)  # (0.5 - 0.1) / (5 - 1); 1-token out
    assert summary["ttft_ms_mean"] == pytest.approx(200.0)
    assert summary["itl_ms_p99"] == pytest.approx(100.0)
    assert summary["goodput"] == 0.5  # the 1-token request misses the TTFT SLO
    assert serve.summarize(results, 2.0, {"tpot": 150})["goodput"] == 1.0
    assert serve.summarize(results, 2.0, {})["goodput"] is None


def test_slo_and_arrivals():
    assert serve.parse_slo("ttft=500,tpot=50") == {"ttft": 500.0, "tpot": 50.0}
    assert serve.parse_slo(None) == {}
    with pytest.raises(ValueError, match="NAME=MS"):
        serve.parse_slo("itl=5")
    offsets = serve.arrival_offsets(4000, rate=20.0, seed=1)
    assert offsets[0] == 0 and (offsets[1:] >= offsets[:-1]).all()
    assert offsets[-1] / 3999 == pytest.approx(1 / 20.0, rel=0.05)  # mean gap 1 / rate
    assert (serve.arrival_offsets(5, float("inf"), 0) == 0).all()


# serve: against real processes
@pytest.fixture(scope="module")
def served(tiny_models):
    from tests.e2e.conftest import start_serve, stop_serve

    instance = start_serve(tiny_models["llama"], "--num-kv-blocks", "512")
    yield instance
    assert stop_serve(instance) == 0, "".join(instance.output[-40:])


@pytest.mark.parametrize("backend", ["grpc", "openai"])
def test_serve_poisson_load(tmp_path, served, backend):
    if backend == "openai":
        pytest.importorskip("httpx")
        target = ["--base-url", f"http://127.0.0.1:{served.http_port}", "--vocab-size", "2000"]
    else:
        target = ["--target", f"127.0.0.1:{served.grpc_port}"]
    payload = bench(tmp_path, "serve", "--backend", backend, *target, "--num-prompts", "8",
                    "--request-rate", "40", "inf", "--random-input-len", "8", "32",
                    "--random-output-len", "2", "12", "--slo", "ttft=60000,tpot=60000")
    assert payload["model"]["name"] == "llama" and payload["model"]["max_model_len"] > 0
    assert [r["request_rate"] for r in payload["rows"]] == [40.0, "inf"]
    for row in payload["rows"]:
        assert (row["completed"], row["failed"]) == (8, 0), row["errors"]
        assert row["num_output_tokens"] == row["dataset"]["num_output_tokens"]
        assert row["goodput"] == pytest.approx(row["request_throughput"])
        for metric in ("ttft", "tpot", "itl", "e2el"):
            values = [row[f"{metric}_ms_{k}"] for k in ("p50", "p90", "p99")]
            assert values == sorted(values) and values[0] > 0, metric
        for request in row["requests"]:
            assert 0 < request["ttft_ms"] <= request["e2el_ms"]
        # the tiers' own timings (gRPC only): a TTFT taken apart, each part within it
        server = [row.get(f"server_{p}_ms_p50") for p in ("prefill", "time_to_first_token")]
        if backend == "grpc":
            assert 0 < server[0] <= server[1] <= row["ttft_ms_p99"], server
        else:
            assert server == [None, None]
    served.assert_all_blocks_free()


# the command line and its optional dependencies
def test_bench_is_a_tandem_subcommand():
    args = build_parser().parse_args(["bench", "latency", "--model", "qwen3-0.6b",
                                      "--batch-sizes", "1", "4"])
    assert (args.command, args.bench_mode, args.batch_sizes) == ("bench", "latency", [1, 4])
    assert args.load_format is None and args.context_len == 512


def test_bundled_configs_resolve_to_dummy_weights():
    from engine.bench import runtime

    assert runtime.bundled_model_names() == ["llama-3.1-8b", "qwen3-0.6b"]
    path, load_format = runtime.resolve_model("llama-3.1-8b")
    assert (path / "config.json").is_file() and load_format == "dummy"
    with pytest.raises(ValueError, match="bundled config"):
        runtime.resolve_model("no-such-model")


def test_cli_and_serve_import_without_torch():
    code = ("import sys\nimport engine.bench.cli, engine.bench.serve\n"
            "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_without_matplotlib_or_tqdm_the_bench_degrades(tmp_path, monkeypatch, caplog):
    real_find_spec = report.importlib.util.find_spec
    monkeypatch.setattr(report.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("matplotlib", "tqdm")
                        else real_find_spec(name, *a))
    with caplog.at_level(logging.INFO, logger="engine.bench"):
        assert report.save_plot(tmp_path / "p.png", lambda plt: None) is False
        with report.Progress(3, "work") as progress:
            progress.update(3)
    assert not (tmp_path / "p.png").exists()
    assert "plot skipped" in caplog.text and "work: 3/3" in caplog.text


def test_json_has_no_bare_infinity(tmp_path):
    report.write_json(tmp_path / "x.json", {"rate": math.inf, "rows": [{"v": math.nan}]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"rate": "inf", "rows": [{"v": None}]}


def test_serve_sends_the_api_key(tmp_path, tiny_models):
    """Against a gateway with --api-key: the key (flag or $TANDEM_API_KEY) is sent over gRPC and
    HTTP; without it the warm-up request fails with UNAUTHENTICATED."""
    from tests.e2e.conftest import start_serve, stop_serve

    keyed = start_serve(tiny_models["llama"], "--num-kv-blocks", "256", "--api-key", "s3cret")
    try:
        common = ["--num-prompts", "2", "--request-rate", "inf", "--random-input-len", "4", "8",
                  "--random-output-len", "2", "4"]
        grpc_target = ["--target", f"127.0.0.1:{keyed.grpc_port}"]
        payload = bench(tmp_path, "serve", *grpc_target, "--api-key", "s3cret", *common)
        assert payload["rows"][0]["completed"] == 2
        http_target = ["--backend", "openai", "--base-url", f"http://127.0.0.1:{keyed.http_port}",
                       "--vocab-size", "2000"]
        payload = bench(tmp_path, "serve", *http_target, "--api-key", "s3cret", *common)
        assert payload["rows"][0]["completed"] == 2
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            bench(tmp_path, "serve", *grpc_target, *common)
    finally:
        assert stop_serve(keyed) == 0
