"""`tandem bench serve`: Poisson arrivals at one or more rates against a running gateway, through
the public gRPC API (tandem.v1.Generation/Generate, streaming; needs only grpcio) or the OpenAI
HTTP API (POST /v1/completions with stream=true; needs httpx).

Prompts are token ids (exact lengths), sampled with ignore_eos, so each request generates the
output length it drew. Each rate draws its own prompts (seed + rate index), so the prefill tier's
prefix cache holds none of them; one untimed warm-up request runs first. Arrival gaps are
exponential with mean 1 / rate (rate inf: all at once).

Per request, as vLLM's `bench serve` measures (shared/ANCHORS.md). A chunk is a streamed message
that carries tokens (gRPC) or a completion choice (OpenAI), timed on arrival:

    TTFT   first chunk - send
    ITL    every gap between consecutive chunks (pooled over requests)
    E2EL   last chunk - send
    TPOT   (E2EL - TTFT) / (output tokens - 1), for requests of more than one token

Over a rate's window (first send until the last request ended): requests/s, output tokens/s and
total tokens/s of the completed requests; mean, p50, p90, p99 of each latency; goodput = requests
meeting every given SLO (--slo ttft=MS,tpot=MS,e2el=MS) per second, a one-token request's TPOT
counting as 0, as in vLLM.

With the gRPC backend, each request's final message also carries the tiers' own PhaseTimings
(queue, prefill queue, prefill compute, KV transfer, TTFT at the decode tier); their mean and
percentiles go into the JSON as `server_<phase>_ms_*`, so a TTFT can be taken apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np

from engine.bench import report
from engine.bench.datasets import BenchRequest, Workload, build_workload, warmup_requests
from protos.tandem.v1 import common_pb2, generation_pb2, generation_pb2_grpc

SLO_METRICS = ("ttft", "tpot", "e2el")
# PhaseTimings fields (seconds) summarised from the gRPC final messages
SERVER_PHASES = ("queue_s", "prefill_queue_s", "prefill_s", "transfer_s",
                 "time_to_first_token_s")
PERCENTILES = (50, 90, 99)
WARMUP_OUTPUT_LEN = 4

COLUMNS = [report.Column("request_rate", "rate (req/s)"), report.Column("completed", "completed"),
           report.Column("request_throughput", "req/s", "{:.2f}"),
           report.Column("output_throughput", "output tok/s", "{:.1f}"),
           report.Column("ttft_ms_p50", "TTFT p50 ms", "{:.1f}"),
           report.Column("ttft_ms_p99", "TTFT p99 ms", "{:.1f}"),
           report.Column("tpot_ms_p50", "TPOT p50 ms", "{:.2f}"),
           report.Column("tpot_ms_p99", "TPOT p99 ms", "{:.2f}"),
           report.Column("itl_ms_p50", "ITL p50 ms", "{:.2f}"),
           report.Column("itl_ms_p99", "ITL p99 ms", "{:.2f}"),
           report.Column("e2el_ms_p50", "E2EL p50 ms", "{:.1f}"),
           report.Column("e2el_ms_p99", "E2EL p99 ms", "{:.1f}"),
           report.Column("goodput", "goodput req/s", "{:.2f}")]


@dataclass(slots=True)
class RequestResult:
    """What one request's stream showed, timed on this client's perf_counter."""

    input_len: int
    output_len: int = 0  # tokens received
    ttft_s: float | None = None
    e2el_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    phases: dict[str, float] | None = None  # the tiers' PhaseTimings (gRPC), seconds
    _sent: float = field(default_factory=time.perf_counter, init=False, repr=False)
    _last: float | None = field(default=None, init=False, repr=False)

    def chunk(self, num_tokens: int) -> None:
        """Records a chunk arriving now with num_tokens tokens."""
        now = time.perf_counter()
        if self._last is None:
            self.ttft_s = now - self._sent
        else:
            self.itl_s.append(now - self._last)
        self._last = now
        self.output_len += num_tokens

    def end(self, completion_tokens: int | None) -> None:
        """Closes a successful stream; an error if no chunk came or usage disagrees."""
        if self._last is None:
            self.error = "the stream carried no tokens"
            return
        self.e2el_s = self._last - self._sent
        if completion_tokens is not None and completion_tokens != self.output_len:
            self.error = (f"usage reports {completion_tokens} completion tokens, the stream "
                          f"carried {self.output_len}")


class Target(Protocol):
    """A running gateway, seen through one API."""

    async def model_info(self) -> dict[str, Any]: ...

    async def send(self, request: BenchRequest) -> RequestResult: ...

    async def close(self) -> None: ...


class GrpcTarget:
    """tandem.v1.Generation on HOST:PORT."""

    def __init__(self, address: str, model: str, temperature: float, timeout_s: float,
                 api_key: str | None = None):
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._model, self._temperature, self._timeout_s = model, temperature, timeout_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    async def model_info(self) -> dict[str, Any]:
        info = await self._stub.GetModelInfo(generation_pb2.GetModelInfoRequest(),
                                             timeout=self._timeout_s, metadata=self._metadata)
        return {"name": info.name, "architecture": info.architecture,
                "max_model_len": info.max_model_len, "vocab_size": info.vocab_size}

    async def send(self, request: BenchRequest) -> RequestResult:
        result = RequestResult(len(request.prompt_token_ids))
        pb = generation_pb2.GenerateRequest(
            model=self._model, token_ids=generation_pb2.TokenIds(ids=request.prompt_token_ids),
            sampling=common_pb2.SamplingParams(max_tokens=request.output_len,
                                               temperature=self._temperature, ignore_eos=True))
        completion_tokens = None
        try:
            async for response in self._stub.Generate(pb, timeout=self._timeout_s,
                                                      metadata=self._metadata):
                if response.token_ids:
                    result.chunk(len(response.token_ids))
                if response.HasField("usage"):
                    completion_tokens = response.usage.completion_tokens
                if response.HasField("timings"):
                    result.phases = {name: getattr(response.timings, name)
                                     for name in SERVER_PHASES}
        except grpc.aio.AioRpcError as e:
            result.error = f"{e.code().name}: {e.details()}"
            return result
        result.end(completion_tokens)
        return result

    async def close(self) -> None:
        await self._channel.close()


class OpenAITarget:
    """POST /v1/completions (streamed) on BASE_URL; the vocabulary size must be given."""

    def __init__(self, base_url: str, model: str, vocab_size: int | None, temperature: float,
                 timeout_s: float, api_key: str | None = None):
        import httpx

        if vocab_size is None:
            raise ValueError("--backend openai needs --vocab-size (the OpenAI API does not say "
                             "it; prompts are random token ids below it)")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # else a log line per request
        self._httpx = httpx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = httpx.AsyncClient(base_url=base_url, timeout=timeout_s, headers=headers)
        self._model, self._vocab_size, self._temperature = model, vocab_size, temperature

    async def model_info(self) -> dict[str, Any]:
        response = await self._client.get("/v1/models")
        response.raise_for_status()
        models = response.json()["data"]
        entry = next((m for m in models if m["id"] == self._model), models[0])
        self._model = entry["id"]
        return {"name": entry["id"], "architecture": None,
                "max_model_len": entry.get("max_model_len"), "vocab_size": self._vocab_size}

    async def send(self, request: BenchRequest) -> RequestResult:
        result = RequestResult(len(request.prompt_token_ids))
        body = {"model": self._model, "prompt": request.prompt_token_ids,
                "max_tokens": request.output_len, "temperature": self._temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                completion_tokens = await self._read(response, result)
        except self._httpx.HTTPError as e:
            result.error = f"{type(e).__name__}: {e}"
            return result
        if result.error is None:
            result.end(None)
            result.output_len = completion_tokens  # chunks carry text; usage counts the tokens
        return result

    @staticmethod
    async def _read(response, result: RequestResult) -> int | None:
        """Times the SSE stream's chunks into `result` (an error on failure); returns the usage
        chunk's completion_tokens."""
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return None
        completion_tokens = None
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue  # blank separators and ': ping' keepalives
            data = json.loads(line[len("data: "):])
            if "error" in data:
                result.error = f"stream error: {data['error'].get('message')}"
                return None
            if data.get("choices"):
                result.chunk(0)
            elif data.get("usage"):
                completion_tokens = data["usage"]["completion_tokens"]
        if completion_tokens is None:
            result.error = "the stream ended without a usage chunk"
        return completion_tokens

    async def close(self) -> None:
        await self._client.aclose()


def arrival_offsets(num_requests: int, rate: float, seed: int) -> np.ndarray:
    """Send times from the start, in seconds: a Poisson process (exponential gaps of mean
    1 / rate), the first at 0; all 0 for an infinite rate."""
    if np.isinf(rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num_requests)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


async def run_rate(target: Target, workload: Workload, rate: float,
                   seed: int) -> tuple[list[RequestResult], float]:
    """Sends the workload at `rate`; (per-request results in workload order, window seconds)."""
    offsets = arrival_offsets(len(workload.requests), rate, seed)
    progress = report.Progress(len(workload.requests), f"rate {rate} req/s")
    started = time.perf_counter()

    async def send_at(request: BenchRequest, offset: float) -> RequestResult:
        await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
        result = await target.send(request)
        progress.update()
        return result

    try:
        results = await asyncio.gather(*(send_at(r, o) for r, o in zip(workload.requests, offsets)))
    finally:
        progress.close()
    return list(results), time.perf_counter() - started


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=500,tpot=50' -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slo: dict[str, float] = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in SLO_METRICS:
            raise ValueError(f"--slo takes NAME=MS items with NAME in {SLO_METRICS}, got {item!r}")
        slo[name.strip()] = float(value)
    return slo


def summarize(results: list[RequestResult], duration_s: float,
              slo_ms: dict[str, float]) -> dict[str, Any]:
    """The rate's figures (module docstring); latencies in milliseconds."""
    done = [r for r in results if r.error is None]
    tpots = [_tpot(r) for r in done]
    num_input = sum(r.input_len for r in done)
    num_output = sum(r.output_len for r in done)
    summary: dict[str, Any] = {
        "num_prompts": len(results), "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration_s, "num_input_tokens": num_input, "num_output_tokens": num_output,
        "request_throughput": len(done) / duration_s,
        "output_throughput": num_output / duration_s,
        "total_token_throughput": (num_input + num_output) / duration_s}
    summary |= _distribution("ttft", [r.ttft_s for r in done])
    summary |= _distribution("tpot", [t for r, t in zip(done, tpots) if r.output_len > 1])
    summary |= _distribution("itl", [gap for r in done for gap in r.itl_s])
    summary |= _distribution("e2el", [r.e2el_s for r in done])
    for phase in SERVER_PHASES:
        values = [r.phases[phase] for r in done if r.phases is not None]
        if values:
            summary |= _distribution(f"server_{phase.removesuffix('_s')}", values)
    summary["goodput"] = _goodput(done, tpots, slo_ms, duration_s) if slo_ms else None
    summary["requests"] = [{"input_len": r.input_len, "output_len": r.output_len,
                            "ttft_ms": _ms(r.ttft_s), "e2el_ms": _ms(r.e2el_s), "error": r.error}
                           for r in results]
    return summary


def _tpot(result: RequestResult) -> float:
    if result.output_len <= 1:
        return 0.0
    return (result.e2el_s - result.ttft_s) / (result.output_len - 1)


def _goodput(done: list[RequestResult], tpots: list[float], slo_ms: dict[str, float],
             duration_s: float) -> float:
    """Requests within every SLO, per second of the window."""
    good = 0
    for result, tpot in zip(done, tpots):
        values = {"ttft": result.ttft_s, "tpot": tpot, "e2el": result.e2el_s}
        good += all(values[name] * 1e3 <= limit for name, limit in slo_ms.items())
    return good / duration_s


def _distribution(name: str, values_s: list[float]) -> dict[str, float | None]:
    """{name}_ms_mean and {name}_ms_p50/p90/p99 (None without samples)."""
    keys = [f"{name}_ms_mean"] + [f"{name}_ms_p{p}" for p in PERCENTILES]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s) * 1e3
    return dict(zip(keys, [float(ms.mean()), *(float(np.percentile(ms, p)) for p in PERCENTILES)]))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _target(args: argparse.Namespace) -> GrpcTarget | OpenAITarget:
    api_key = args.api_key or os.environ.get("TANDEM_API_KEY")
    if args.backend == "grpc":
        return GrpcTarget(args.target, args.served_model_name or "", args.temperature,
                          args.request_timeout, api_key)
    return OpenAITarget(args.base_url, args.served_model_name or "", args.vocab_size,
                        args.temperature, args.request_timeout, api_key)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    target = _target(args)
    try:
        model = await target.model_info()
        slo_ms = parse_slo(args.slo)
        workloads = [build_workload(args.dataset, args.num_prompts, model["vocab_size"],
                                    args.seed + i, model["max_model_len"],
                                    tuple(args.random_input_len), tuple(args.random_output_len))
                     for i in range(len(args.request_rate))]
        warmup = (await target.send(warmup_requests(workloads[0], 1, WARMUP_OUTPUT_LEN,
                                                    model["vocab_size"])[0]))
        if warmup.error:
            raise RuntimeError(f"the warm-up request failed: {warmup.error}")
        rows = []
        for i, (rate, workload) in enumerate(zip(args.request_rate, workloads)):
            results, duration_s = await run_rate(target, workload, rate, args.seed + i)
            rows.append({"request_rate": rate, "dataset": workload.describe()}
                        | summarize(results, duration_s, slo_ms))
    finally:
        await target.close()
    endpoint = args.target if args.backend == "grpc" else args.base_url
    return {"mode": "serve", "environment": report.environment(None, args.argv),
            "backend": args.backend, "endpoint": endpoint, "model": model, "slo_ms": slo_ms,
            "sampling": {"temperature": args.temperature, "ignore_eos": True}, "rows": rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The payload of a serve sweep (see the module docstring for every figure)."""
    return asyncio.run(_run(args))


def table(payload: dict[str, Any]) -> str:
    lines = [report.markdown_table(payload["rows"], COLUMNS)]
    failed = sum(r["failed"] for r in payload["rows"])
    if failed:
        errors = sorted({e for r in payload["rows"] for e in r["errors"]})
        lines.append(f"{failed} requests failed: {'; '.join(errors)}")
    if payload["slo_ms"]:
        lines.append("goodput SLOs (ms): " + ", ".join(f"{k} <= {v:g}"
                                                      for k, v in payload["slo_ms"].items()))
    return "\n".join(lines)


def draw(payload: dict[str, Any], plt: Any) -> None:
    """TTFT, TPOT (p50, p99) and throughput by request rate (rates as categories: inf too)."""
    rows = payload["rows"]
    x = range(len(rows))
    labels = [f"{r['request_rate']:g}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, title in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        for p in (50, 99):
            ax.plot(x, [r[f"{metric}_ms_p{p}"] for r in rows], "o-", label=f"p{p}")
        ax.set(ylabel="ms", title=title)
    axes[2].plot(x, [r["request_throughput"] for r in rows], "o-", label="completed")
    if payload["slo_ms"]:
        axes[2].plot(x, [r["goodput"] for r in rows], "s-", label="goodput")
    axes[2].set(ylabel="requests/s", title="throughput")
    for ax in axes:
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("request rate (req/s)")
        ax.legend()
    fig.suptitle(f"{payload['model']['name']} via {payload['backend']} ({payload['endpoint']})")
