"""Runs one scheduled step through the model: the step's inputs go into persistent buffers, the
model runs (a CUDA graph replay for decode batches on CUDA), and every request whose chunk
reaches its last token is sampled.

    host (pinned)                         device (persistent)
    tokens [3, max_tokens] int32          input ids | positions | slot mapping (-1 = padding)
    seqs   [2, max_seqs + 1] int32        seq lens | query start locs
    table  [max_seqs, max_blocks] int32   block tables (only the columns in use are copied)

One step = filling the host rows with numpy, three copies to the device (non-blocking from
pinned memory), the forward, sampling; the only host-device synchronisation in a step is
reading the sampled tokens (with the logprobs of the rows that asked for them, in the same
transfer), and one more per slice of prompt positions for a request that asked for prompt
logprobs: its chunk's logits are computed at every position, at most PROMPT_LOGITS_ELEMENTS at a
time.

CUDA graphs. A graph is captured at start-up for each (batch size B, query length q) with q in
`RunnerConfig.graph_query_lens`: B sequences of at most q new tokens each, B * q token slots.
q = 1 are the decode graphs; a decode tier that speculates k tokens also captures q = k + 1, so
its verification steps (each sequence's last token and up to k drafts) and the draft model's
catch-up passes replay a graph instead of running eagerly. A step replays the graph of the
smallest q that holds its longest chunk, then the smallest B that holds its sequences, padded:
padding sequences have no queries, padding tokens write no KV, and a sequence with fewer than q
tokens simply has a shorter query run (the attention kernel reads the real query offsets from
the device buffers; q only sizes its grid). The graph computes logits at all B * q slots; the
rows the step samples are selected after the replay. Steps with a longer chunk (prompt
chunks), or with rows wanting prompt logprobs, run eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterable, NamedTuple

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.request import Request
from engine.speculative import verify
from engine.sampler import SamplingError, prompt_logprobs, sample_with_logprobs
from engine.sampling_params import SamplingParams, TokenLogprobs
from engine.scheduler import ScheduledChunk, cdiv

logger = logging.getLogger("engine")

# Prompt logprobs: logits of at most this many (positions x vocab) elements exist at once.
PROMPT_LOGITS_ELEMENTS = 1 << 24


class StepResult(NamedTuple):
    """What one step produced: request_id -> sampled token, or for a request that had draft
    tokens scored (speculative decoding) the list of verified tokens (its accepted drafts, then
    one more); request_id -> why sampling failed for the requests whose row could not be
    sampled (only those fail); request_id -> the sampled token's logprobs for the requests that
    asked (`sampling.logprobs` set; never with drafts: the decode tier proposes none for them);
    request_id -> the prompt logprobs of its chunk (`sampling.prompt_logprobs` set, before its
    first token): those of the prompt tokens after each position the chunk ran, in order."""

    sampled: dict[str, int | list[int]]
    failed: dict[str, str]
    logprobs: dict[str, TokenLogprobs]
    prompt_logprobs: dict[str, list[TokenLogprobs]]


@dataclass(frozen=True)
class RunnerConfig:
    block_size: int
    max_num_seqs: int            # sequences in one step at most
    max_num_tokens: int          # tokens in one step at most (the scheduler's budget)
    max_model_len: int
    cuda_graphs: bool = False    # capture decode graphs (CUDA only; --enforce-eager turns off)
    # query lengths graphs are captured for: 1 (decode); k + 1 too when speculating k tokens
    graph_query_lens: tuple[int, ...] = (1,)


def _wants_prompt_logprobs(request: Request) -> bool:
    """Whether a chunk of the request gives prompt logprobs: it asked, and its prompt is being
    computed for its first token (not recomputed after a preemption on the decode tier)."""
    return request.sampling.prompt_logprobs is not None and not request.output_token_ids


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes captured: 1, 2, 4, 8, then steps of 8 to 64, of 16 beyond."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    size = 8
    while size < max_num_seqs:
        sizes.append(size)
        size += 8 if size < 64 else 16
    return sizes + [max_num_seqs]


def graph_key(captured: Iterable[tuple[int, int]], num_seqs: int,
              longest: int) -> tuple[int, int] | None:
    """Which captured (batch size, query length) graph runs a step of `num_seqs` sequences
    whose longest chunk has `longest` tokens: the smallest query length that holds the longest
    chunk, then the smallest batch size that holds the sequences; None: run eagerly."""
    return min((key for key in captured if key[1] >= longest and key[0] >= num_seqs),
               key=lambda key: (key[1], key[0]), default=None)


class StepBuffers:
    """The persistent input buffers, a pinned host copy and a device copy of each."""

    def __init__(self, config: RunnerConfig, device: torch.device):
        self.max_blocks = cdiv(config.max_model_len, config.block_size)
        pin = device.type == "cuda"
        shapes = {"tokens": (3, config.max_num_tokens), "seqs": (2, config.max_num_seqs + 1),
                  "table": (config.max_num_seqs, self.max_blocks)}
        self.host = {k: torch.zeros(s, dtype=torch.int32, pin_memory=pin) for k, s in shapes.items()}
        self.dev = {k: torch.zeros(s, dtype=torch.int32, device=device) for k, s in shapes.items()}
        self.np = {k: v.numpy() for k, v in self.host.items()}
        # the used corner of the block table, packed contiguously: a copy from a strided host
        # slice would go through an unpinned temporary, synchronously (see upload)
        self._table_stage = torch.zeros(config.max_num_seqs * self.max_blocks, dtype=torch.int32,
                                        pin_memory=pin)
        # what each block table row holds (a copy of the block ids last written there): a row
        # is rewritten only when its chunk's blocks differ, so a decode step writes a row only
        # when its request gained a block or the row went to another request
        self._table_rows: list[list[int]] = [[] for _ in range(config.max_num_seqs)]
        # the last upload's copies read the host buffers until this event: wait before refilling
        self._uploaded = torch.cuda.Event() if pin else None

    def fill(self, chunks: list[ScheduledChunk], block_size: int, num_seqs: int,
             num_tokens: int) -> int:
        """Writes the step's inputs into the host buffers, padded to num_seqs sequences and
        num_tokens tokens; returns the widest block table row used."""
        if self._uploaded is not None:
            self._uploaded.synchronize()  # normally long done: the last step read its tokens
        ids, pos, slots = self.np["tokens"]
        seq_lens, starts = self.np["seqs"]
        table, table_rows = self.np["table"], self._table_rows
        widest, token_ids, computed, counts = 1, [], [], []
        for i, (request, n) in enumerate(chunks):
            start = request.num_computed_tokens
            token_ids += request.token_ids(start, start + n)
            blocks = request.block_ids
            if blocks != table_rows[i]:
                table[i, :len(blocks)] = blocks
                table_rows[i] = list(blocks)
            widest = max(widest, len(blocks))
            computed.append(start)
            counts.append(n)
        k, t = len(chunks), len(token_ids)
        computed, counts = np.array(computed, dtype=np.int64), np.array(counts, dtype=np.int64)
        starts[0] = 0
        np.cumsum(counts, out=starts[1:k + 1])
        seq_lens[:k] = computed + counts
        ids[:t] = token_ids
        # position of token j of chunk i: computed[i] + j, i.e. its step index - (starts[i] -
        # computed[i])
        rows = np.repeat(np.arange(k), counts)
        pos[:t] = np.arange(t) - (starts[:k] - computed)[rows]
        slots[:t] = table[rows, pos[:t] // block_size] * block_size + pos[:t] % block_size
        ids[t:num_tokens], pos[t:num_tokens], slots[t:num_tokens] = 0, 0, -1
        seq_lens[k:num_seqs] = 0
        starts[k + 1:num_seqs + 1] = t
        return widest

    def upload(self, num_seqs: int, num_tokens: int, widest: int) -> None:
        """Copies the used parts of the host buffers to the device (asynchronously on CUDA).
        Every copy reads a contiguous pinned range: torch copies a strided host slice through an
        unpinned contiguous temporary, i.e. a synchronous pageable copy (~0.4 ms per step on an
        H100 when these were strided slices)."""
        host, dev = self.host, self.dev
        for name, used in (("tokens", num_tokens), ("seqs", num_seqs + 1)):
            for row in range(host[name].shape[0]):
                dev[name][row, :used].copy_(host[name][row, :used], non_blocking=True)
        stage = self._table_stage[:num_seqs * widest].view(num_seqs, widest)
        stage.numpy()[:] = self.np["table"][:num_seqs, :widest]
        dev["table"][:num_seqs, :widest].copy_(stage, non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()

    def metadata(self, chunks: list[ScheduledChunk], num_seqs: int, num_tokens: int,
                 max_query_len: int, max_seq_len: int) -> AttentionMetadata:
        seq_lens, starts = self.np["seqs"]
        return AttentionMetadata(
            slot_mapping=self.dev["tokens"][2, :num_tokens],
            block_tables=self.dev["table"][:num_seqs],
            seq_lens=seq_lens[:num_seqs].tolist(), query_start_loc=starts[:num_seqs + 1].tolist(),
            seq_lens_t=self.dev["seqs"][0, :num_seqs],
            query_start_loc_t=self.dev["seqs"][1, :num_seqs + 1],
            max_query_len=max_query_len, max_seq_len=max_seq_len)


class ModelRunner:
    """Owns the model, the KV cache tensor, the step buffers and the decode graphs. Called from
    the engine thread only."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, config: RunnerConfig,
                 device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.config = config
        self.block_size = config.block_size
        self.device = device
        # the sampler masks them until a request has min_tokens output tokens
        self.eos_token_ids = frozenset(model.config.eos_token_ids)
        self.buffers = StepBuffers(config, device)
        # (batch size, query length) -> the graph and its logits output [batch * q, vocab]
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if config.cuda_graphs and device.type == "cuda":
            self.capture_graphs()
        if device.type == "cuda":
            self.warm_up_sampler()

    # one step
    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> StepResult:
        """Runs the step; samples a token for each chunk that ends its sequence, and gives the
        prompt logprobs of the chunks whose request asked for them."""
        result = StepResult({}, {}, {}, {})
        if not chunks:
            return result
        rows, sampling, speculating = [], [], []  # chunk index, request; (chunk, request) drafts
        for i, (request, num_tokens) in enumerate(chunks):
            end = request.num_computed_tokens + num_tokens
            if request.spec_token_ids and end == request.num_tokens + len(request.spec_token_ids):
                speculating.append((i, request))
            elif end == request.num_tokens:
                rows.append(i)
                sampling.append(request)
        scoring = [i for i, (request, _) in enumerate(chunks) if _wants_prompt_logprobs(request)]
        num_tokens = sum(n for _, n in chunks)
        graph = None if scoring else self._graph_key(chunks)
        if graph is not None:
            replayed = self._replay(chunks, graph)
            starts = list(accumulate((n for _, n in chunks), initial=0))
        else:
            hidden, meta = self._forward(chunks, num_tokens)
            starts = meta.query_start_loc
            for i in scoring:
                self._prompt_logprobs(hidden, starts[i], chunks[i], result)
            if not rows and not speculating:
                return result
        # the logits rows: each sampled chunk's last token, then each speculating chunk's
        # last verified token and its drafts
        ends = [starts[i + 1] for i, _ in speculating]
        scored = [t for end, (_, r) in zip(ends, speculating)
                  for t in range(end - len(r.spec_token_ids) - 1, end)]
        picked = [starts[i + 1] - 1 for i in rows] + scored
        if graph is not None:
            all_logits = (replayed[:len(picked)] if picked == list(range(len(picked))) else
                          replayed[torch.tensor(picked, dtype=torch.int64).to(self.device)])
        else:
            all_logits = self.model.compute_logits(hidden[picked])
        logits, spec_logits = all_logits[:len(rows)], all_logits[len(rows):]
        if speculating:
            self._verify(spec_logits, [r for _, r in speculating], result)
        if not rows:
            return result
        sampled = sample_with_logprobs(logits, sampling, self.eos_token_ids)
        for request, token, logprobs in zip(sampling, *sampled):
            if isinstance(token, SamplingError):
                result.failed[request.request_id] = f"sampling failed: {token}"
                continue
            result.sampled[request.request_id] = token
            if logprobs is not None:
                result.logprobs[request.request_id] = logprobs
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, first: int, chunk: ScheduledChunk,
                         result: StepResult) -> None:
        """The prompt logprobs of `chunk` (its hidden states start at row `first`) into
        `result`: position p gives prompt token p + 1's, so the prompt's last position (it
        samples the first token) gives none. Logits are computed a slice of positions at a
        time."""
        request, num_tokens = chunk
        start = request.num_computed_tokens
        count = min(start + num_tokens, request.num_prompt_tokens - 1) - start
        entries: list[TokenLogprobs] = []
        step = max(1, PROMPT_LOGITS_ELEMENTS // self.model.config.vocab_size)
        next_ids = torch.tensor(request.prompt_token_ids[start + 1:start + 1 + max(count, 0)],
                                dtype=torch.int64, device=hidden.device)
        for s in range(0, count, step):
            e = min(count, s + step)
            logits = self.model.compute_logits(hidden[first + s:first + e])
            entries += prompt_logprobs(logits, next_ids[s:e], request.sampling.prompt_logprobs)
        result.prompt_logprobs[request.request_id] = entries

    def _verify(self, logits: torch.Tensor, requests: list[Request], result: StepResult) -> None:
        """The verified tokens of requests whose drafts were scored (logits: each one's last
        token and drafts, in order), into `result`."""
        verified = verify(logits, requests, [r.spec_token_ids for r in requests],
                          self.eos_token_ids)
        for request, tokens in zip(requests, verified):
            if isinstance(tokens, SamplingError):
                result.failed[request.request_id] = f"sampling failed: {tokens}"
            else:
                result.sampled[request.request_id] = tokens

    def _forward(self, chunks: list[ScheduledChunk], num_tokens: int
                 ) -> tuple[torch.Tensor, AttentionMetadata]:
        """Eager forward of the step: the final hidden states [T, hidden] and the metadata."""
        buffers, num_seqs = self.buffers, len(chunks)
        widest = buffers.fill(chunks, self.block_size, num_seqs, num_tokens)
        buffers.upload(num_seqs, num_tokens, widest)
        max_query_len = max(n for _, n in chunks)
        max_seq_len = max(r.num_computed_tokens + n for r, n in chunks)
        meta = buffers.metadata(chunks, num_seqs, num_tokens, max_query_len, max_seq_len)
        tokens = buffers.dev["tokens"]
        return self.model(tokens[0, :num_tokens], tokens[1, :num_tokens], self.kv_cache,
                          meta), meta

    @torch.inference_mode()
    def warm_up_sampler(self) -> None:
        """Samples dummy rows once per variant of the sampling kernel (with and without top-k,
        at batch 1 and at the largest batch: vocabulary split or not), so the first sampled
        request does not wait for Triton to compile them."""
        started = time.monotonic()
        vocab = self.model.config.vocab_size
        for batch in sorted({1, self.config.max_num_seqs}):
            for top_k in (0, 5):
                params = SamplingParams(max_tokens=1, temperature=1.0, top_k=top_k, seed=0).validate()
                requests = [Request(f"warm-up-{i}", [0], params) for i in range(batch)]
                logits = torch.zeros((batch, vocab), dtype=torch.float32, device=self.device)
                sample_with_logprobs(logits, requests, self.eos_token_ids)
        logger.info("sampling kernels ready in %.1f s", time.monotonic() - started)

    # CUDA graphs
    def _graph_key(self, chunks: list[ScheduledChunk]) -> tuple[int, int] | None:
        """The captured (batch size, query length) to replay this step with, or None."""
        return graph_key(self.graphs, len(chunks), max(n for _, n in chunks))

    def _replay(self, chunks: list[ScheduledChunk], key: tuple[int, int]) -> torch.Tensor:
        """Replays the graph of `key` with the step's inputs; its logits [batch * q, vocab]."""
        batch, query_len = key
        buffers = self.buffers
        widest = buffers.fill(chunks, self.block_size, batch, batch * query_len)
        buffers.upload(batch, batch * query_len, widest)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits

    def capture_graphs(self) -> None:
        """Captures one graph per (batch size, query length) (largest first, sharing one memory
        pool). Capture-time inputs are padding (no KV written), so the cache is untouched."""
        started = time.monotonic()
        keys = [(b, q) for q in sorted(set(self.config.graph_query_lens))
                for b in graph_batch_sizes(self.config.max_num_seqs)
                if b * q <= self.config.max_num_tokens]
        pool = torch.cuda.graph_pool_handle()
        tokens, seqs = self.buffers.dev["tokens"], self.buffers.dev["seqs"]
        tokens.zero_()
        tokens[2].fill_(-1)
        seqs.zero_()
        for batch, query_len in sorted(keys, key=lambda key: key[0] * key[1], reverse=True):
            num_tokens = batch * query_len
            meta = AttentionMetadata(
                slot_mapping=tokens[2, :num_tokens],
                block_tables=self.buffers.dev["table"][:batch],
                seq_lens=[0] * batch, query_start_loc=[0] * (batch + 1),
                seq_lens_t=seqs[0, :batch], query_start_loc_t=seqs[1, :batch + 1],
                max_query_len=query_len, max_seq_len=self.config.max_model_len)
            self.graphs[batch, query_len] = self._capture(num_tokens, meta, pool)
        torch.cuda.synchronize()
        for query_len in sorted(set(q for _, q in keys)):
            logger.info("captured %d CUDA graphs of %d token(s) per sequence (batch %s)",
                        sum(q == query_len for _, q in keys), query_len,
                        ",".join(str(b) for b, q in keys if q == query_len))
        logger.info("CUDA graph capture took %.1f s", time.monotonic() - started)

    @torch.inference_mode()
    def _capture(self, num_tokens: int, meta: AttentionMetadata,
                 pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        tokens = self.buffers.dev["tokens"]

        def step() -> torch.Tensor:
            hidden = self.model(tokens[0, :num_tokens], tokens[1, :num_tokens], self.kv_cache,
                                meta)
            return self.model.compute_logits(hidden)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up: compiles the Triton kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = step()
        return graph, logits
