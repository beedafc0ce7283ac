"""Prometheus metrics: vLLM's names under the prefix `tandem:`, plus the KV transfer's. Torch-free
(the gateway uses it too).

    RequestMetrics   what every tier counts about requests (gateway included): tokens, outcomes,
                     TTFT / inter-token / end-to-end latency histograms
    TierMetrics      one prefill or decode instance: RequestMetrics, engine state read at scrape
                     time, per-phase histograms, KV transfer; `serve()` exposes them over HTTP
    StreamTimer      feeds RequestMetrics from one request's stream of outputs

Each instance keeps its metrics in its own `CollectorRegistry` (never the global one), so tests
can run several in one process. Every sample carries the label `tier` (prefill, decode or
gateway): one name per quantity, the tier saying where it was measured. A scraper adds
`instance` (Prometheus as its target label; the gateway's /metrics as the instance's address).

Threads: counters and histograms are thread-safe. Engine state (queues, KV blocks, prefix-cache
counters, expired leases) is read by the scrape, on the HTTP server's thread, without the engine
thread: a snapshot, as GetInstanceInfo reads it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from engine.errors import TandemError

if TYPE_CHECKING:
    from engine.scheduler import Scheduler
    from kvtransfer.lease import LeaseTable

PREFIX = "tandem:"
FINISHED_REASONS = ("stop", "length", "abort", "error")

# Bucket bounds, seconds. Inter-token latency starts at 1 ms: the batch-1 target is ~5 ms a token.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
                   20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0, 60.0)

NUM_REQUESTS_RUNNING = PREFIX + "num_requests_running"
NUM_REQUESTS_RUNNING_HELP = ("Requests being served now: in the running batch (prefill, decode), "
                             "or sent to the tiers and not yet answered (gateway)")


class RequestMetrics:
    """Per-request counters and latency histograms of one tier, in their own registry."""

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.registry = CollectorRegistry()
        self.prompt_tokens = self._counter(
            "prompt_tokens", "Prompt tokens, counted once per request when its first token is out "
            "(prefix-cache hits included; a decode instance counts the prompts whose KV it got)")
        self.generation_tokens = self._counter(
            "generation_tokens", "Generated tokens handed out: completion tokens as usage counts "
            "them (decode, gateway); the first token of each request (prefill)")
        self.request_success = Counter(
            PREFIX + "request_success", "Requests ended, by finished_reason: stop, length "
            "(finished), abort (cancelled, client gone), error (failed); as vLLM, aborts and "
            "errors are counted here too", ["tier", "finished_reason"], registry=self.registry)
        for reason in FINISHED_REASONS:  # present from the start, at 0
            self.request_success.labels(tier, reason)
        self.time_to_first_token = self._histogram(
            "time_to_first_token_seconds", "Arrival at this tier to the first token handed out",
            TTFT_BUCKETS)
        self.inter_token_latency = self._histogram(
            "inter_token_latency_seconds", "Gap between consecutive outputs carrying tokens, as "
            "this tier hands them out", ITL_BUCKETS)
        self.e2e_request_latency = self._histogram(
            "e2e_request_latency_seconds", "Arrival at this tier to the last token (prefill: to "
            "the transfer's acknowledgement), of requests that finished (stop, length)",
            REQUEST_BUCKETS)

    def _counter(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
        """A counter labelled with this tier (and `labels`, left open)."""
        counter = Counter(PREFIX + name, documentation, ["tier", *labels], registry=self.registry)
        return counter if labels else counter.labels(self.tier)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(PREFIX + name, documentation, ["tier"], buckets=buckets,
                         registry=self.registry).labels(self.tier)

    def first_token(self, num_prompt_tokens: int, ttft_s: float) -> None:
        """A request's first token is out: counts its prompt and its time to first token."""
        self.prompt_tokens.inc(num_prompt_tokens)
        self.time_to_first_token.observe(ttft_s)

    def ended(self, finished_reason: str, e2e_s: float | None = None) -> None:
        """A request ended (FINISHED_REASONS, or a finish reason added since); `e2e_s` for one
        that finished."""
        self.request_success.labels(self.tier, finished_reason).inc()
        if e2e_s is not None:
            self.e2e_request_latency.observe(e2e_s)


class TierMetrics(RequestMetrics):
    """The metrics of one prefill or decode instance. `scheduler` is read at scrape time;
    `leases` (decode: kvtransfer.lease.LeaseTable) adds the count of expired leases."""

    def __init__(self, tier: str, scheduler: Scheduler, leases: LeaseTable | None = None) -> None:
        super().__init__(tier)
        self.queue_time = self._histogram(
            "request_queue_time_seconds", "Arrival to admission (KV blocks taken), of requests "
            "that finished", REQUEST_BUCKETS)
        self.prefill_time = self._histogram(
            "request_prefill_time_seconds", "Prefill phase of requests that finished: first "
            "chunk scheduled to first token (prefill); the prefill leg, from its start until the "
            "prompt's KV is in (decode)", REQUEST_BUCKETS)
        self.decode_time = self._histogram(
            "request_decode_time_seconds", "KV in to last token, of requests that finished "
            "(decode)", REQUEST_BUCKETS)
        self.kv_transfer_bytes = self._counter(
            "kv_transfer_bytes", "KV cache bytes of completed transfers: sent (prefill), "
            "received (decode)")
        self.kv_transfer_duration = self._histogram(
            "kv_transfer_duration_seconds", "First KV byte to the transfer's completion, measured "
            "by the receiver (decode)", TRANSFER_BUCKETS)
        self.kv_transfer_failures = self._counter(
            "kv_transfer_failures", "Prompt KV transfers that failed, by cause: the gRPC status "
            "code in lower case (decode: the prefill leg ended without the KV; prefill: the "
            "push ended unacknowledged). Cancellations are not failures", ("cause",))
        self.spec_num_drafts = self._counter(
            "spec_decode_num_drafts", "Speculative decoding: verification steps of a request "
            "with at least one draft token (decode)")
        self.spec_num_draft_tokens = self._counter(
            "spec_decode_num_draft_tokens", "Speculative decoding: draft tokens scored (decode)")
        self.spec_num_accepted_tokens = self._counter(
            "spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens accepted "
            "(decode)")
        self.spec_accepted_per_pos = self._counter(
            "spec_decode_num_accepted_tokens_per_pos", "Speculative decoding: drafts accepted "
            "at each position of a proposal, 0 first (decode)", ("position",))
        self.spec_steps = self._counter(
            "spec_decode_steps", "Speculative decoding: steps of a speculating decode instance, "
            "mode=draft (drafts scored) or plain; with the governor on, a plain share near 1 "
            "means drafting does not pay here and runs only as probes (decode)", ("mode",))
        self.prefill_retries = self._counter(
            "prefill_retries", "Prefill legs retried on another prefill instance after the first "
            "failed with UNAVAILABLE or DEADLINE_EXCEEDED (decode)")
        self.registry.register(_EngineCollector(tier, scheduler, leases))
        self._http: WSGIServer | None = None

    def phases(self, queue_s: float, prefill_s: float, decode_s: float | None = None) -> None:
        """The phase times of a request that finished."""
        self.queue_time.observe(queue_s)
        self.prefill_time.observe(prefill_s)
        if decode_s is not None:
            self.decode_time.observe(decode_s)

    def drafts(self, num_drafts: int, num_accepted: int) -> None:
        """A request's proposal of `num_drafts` tokens was verified; its first `num_accepted`
        were accepted."""
        self.spec_num_drafts.inc()
        self.spec_num_draft_tokens.inc(num_drafts)
        self.spec_num_accepted_tokens.inc(num_accepted)
        for position in range(num_accepted):
            self.spec_accepted_per_pos.labels(self.tier, str(position)).inc()

    def transfer_done(self, num_bytes: int, duration_s: float | None = None) -> None:
        """A prompt's KV transfer completed (`duration_s` where the receiver measured it)."""
        self.kv_transfer_bytes.inc(num_bytes)
        if duration_s is not None:
            self.kv_transfer_duration.observe(duration_s)

    def transfer_failed(self, error: TandemError) -> None:
        """A prompt's KV transfer failed with `error` (its status is the cause)."""
        self.kv_transfer_failures.labels(self.tier, error.status.lower()).inc()

    def serve(self, host: str, port: int) -> int:
        """Serves GET /metrics over HTTP on host:port (0: any free port) from a daemon thread
        until `close()`; returns the bound port."""
        self._http, _ = start_http_server(port, host.strip("[]") or "0.0.0.0",
                                          registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        """Stops the HTTP server, if `serve` started one. Blocks until its thread has noticed
        (up to half a second): call it off the event loop."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _EngineCollector:
    """Engine state, read at each scrape: queue lengths, KV cache usage, prefix-cache counters
    (in tokens, as vLLM counts them: whole blocks) and expired leases."""

    def __init__(self, tier: str, scheduler: Scheduler, leases: LeaseTable | None) -> None:
        self._tier = tier
        self._scheduler = scheduler
        self._leases = leases

    def collect(self) -> Iterator[Metric]:
        scheduler, tier = self._scheduler, self._tier
        pool, block_size = scheduler.pool, scheduler.config.block_size
        num_waiting_for_kv = len(scheduler.waiting_for_kv)
        yield _family(GaugeMetricFamily, NUM_REQUESTS_RUNNING, NUM_REQUESTS_RUNNING_HELP, tier,
                      len(scheduler.running))
        yield _family(GaugeMetricFamily, PREFIX + "num_requests_waiting", "Requests waiting: "
                      "queued for KV blocks, or (decode) holding them while their prompt's KV "
                      "arrives", tier, len(scheduler.waiting) + num_waiting_for_kv)
        yield _family(GaugeMetricFamily, PREFIX + "num_requests_waiting_for_kv", "Of the "
                      "waiting requests, those holding KV blocks while their prompt's KV "
                      "arrives (decode)", tier, num_waiting_for_kv)
        yield _family(GaugeMetricFamily, PREFIX + "kv_cache_usage_perc", "Fraction of KV blocks "
                      "held by requests (1 = 100%); free blocks still in the prefix cache count "
                      "as free", tier, pool.usage)
        yield _family(CounterMetricFamily, PREFIX + "prefix_cache_queries", "Prompt tokens "
                      "looked up in the prefix cache at admission (whole blocks)", tier,
                      pool.num_prefix_queries * block_size)
        yield _family(CounterMetricFamily, PREFIX + "prefix_cache_hits", "Of the queried tokens, "
                      "those found in the prefix cache (whole blocks)", tier,
                      pool.num_prefix_hits * block_size)
        yield _family(CounterMetricFamily, PREFIX + "num_preemptions", "Running requests whose "
                      "KV blocks were taken back when the pool ran out; each is recomputed "
                      "(decode: locally, its prompt and output so far)", tier,
                      scheduler.num_preemptions)
        if self._leases is not None:
            yield _family(CounterMetricFamily, PREFIX + "kv_leases_expired", "KV leases that "
                          "expired under a transfer: it began or wrote after the lease's "
                          "deadline", tier, self._leases.num_expired)


def _family(kind: type[Metric], name: str, documentation: str, tier: str, value: float) -> Metric:
    """A gauge or counter family of one sample, labelled `tier`."""
    family = kind(name, documentation, labels=["tier"])
    family.add_metric([tier], value)
    return family


class StreamTimer:
    """One request's outputs as a tier hands them out, into RequestMetrics: `output()` for each
    output in order, `fail()` if it ends in an error, `close()` at the end on every path. The
    end is counted once, before the last output or the error goes out (so a client that got it
    sees it counted); `close()` counts an end not yet counted as an abort."""

    def __init__(self, metrics: RequestMetrics, num_prompt_tokens: int, arrival: float) -> None:
        self._metrics = metrics
        self._num_prompt_tokens = num_prompt_tokens
        self._arrival = arrival
        self._last_token_at: float | None = None
        self._ended = False

    def output(self, num_tokens: int, finish_reason: str | None = None) -> None:
        """The next output: `num_tokens` new tokens (may be 0), `finish_reason` on the last."""
        now = time.monotonic()
        if num_tokens:
            if self._last_token_at is None:
                self._metrics.first_token(self._num_prompt_tokens, now - self._arrival)
            else:
                self._metrics.inter_token_latency.observe(now - self._last_token_at)
            self._last_token_at = now
            self._metrics.generation_tokens.inc(num_tokens)
        if finish_reason is not None:
            self._end(finish_reason, now - self._arrival)

    def fail(self, cancelled: bool = False) -> None:
        """The request ended in an error (`cancelled`: it was aborted)."""
        self._end("abort" if cancelled else "error")

    def close(self) -> None:
        self._end("abort")

    def _end(self, finished_reason: str, e2e_s: float | None = None) -> None:
        if not self._ended:
            self._ended = True
            self._metrics.ended(finished_reason, e2e_s)
