"""The draft-model proposer: a smaller model with the target's tokenizer proposes each request's
next k tokens greedily, from its own paged KV cache on the decode tier.

How the draft gets the prompt: **its own prefill, on the decode tier**, the first time a request
drafts (and again for whatever the draft has not seen yet: tokens accepted since its last
proposal, or everything after a preemption). The alternative, a second KV layout in the
transfer so the prefill tier computes the draft's KV too, would make every prefill instance load
the draft and every transfer carry a second cache, couple the two tiers' configurations (a
decode instance could no longer turn speculation on or off, or change its draft, alone), and
save little: the draft is several times smaller than the target, so its prefill costs a fraction
of the target's, on the tier that has spare compute while decoding is memory-bound.

Each request has a mirror: a `Request` over the same tokens, with greedy sampling, its own block
table in the draft's pool, and `num_computed_tokens` = how many leading tokens have draft KV. A
proposal (`propose`) syncs each mirror with its request: the target only ever appends tokens, so
the mirror's KV stays valid up to the first draft the target rejected, and the rest is rolled
back by lowering `num_computed_tokens` (its slots are overwritten later; rejected positions need
no other undo). Then the draft runs: catch-up passes (mixed chunks, at most the step's token
budget each) until every mirror has scored its last token, which gives the first draft token;
then k - 1 one-token passes (a CUDA graph replay on the GPU, as target decode steps are). The
last draft token's own KV is never computed: it is rolled back or recomputed next time.

Draft tokens are greedy: point masses, verified by the target's ordinary sampler
(engine/speculative.py), so greedy output is token-identical and sampled output is exactly the
target's distribution (seeded requests produce the same tokens as without speculation).

A proposal catches up at most about two passes' worth of tokens: a mirror further behind than
its share (2 x the step's token budget / the requests drafting, at least a block), a request
that drafts for the first time or after the governor kept drafting off for a while, restarts on
the last that many of its tokens (positions renumbered from 0: the draft sees a window of the
text). Drafts from a window are weaker, never wrong (the target verifies them), and a probe of
the governor after a long run without drafts costs two passes instead of one per ~1,000 tokens
of backlog (at batch 64, every token the batch produced since the last probe).

The draft's pool has as many blocks as the target's, so it never runs out before the target
does; when it still cannot grow a mirror, that request simply gets no drafts this step. A
mirror's blocks go back to the pool when its request leaves the running batch (`keep_only`,
every step) or ends (`forget`, on every finish path of the decode engine).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Collection, Sequence

import torch

from engine.block_pool import BlockPool
from engine.instance import InstanceConfig, attention_backend_name, kv_layout, runner_config
from engine.kv_cache import allocate_kv_cache
from engine.model import load_model
from engine.model_runner import ModelRunner
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import cdiv

logger = logging.getLogger("decode")


class DraftModelProposer:
    """Greedy k-token proposals from a draft model (see the module docstring). Engine thread
    only."""

    def __init__(self, runner: ModelRunner, pool: BlockPool, max_model_len: int):
        self.runner = runner
        self.pool = pool
        self.block_size = runner.config.block_size
        self.max_num_tokens = runner.config.max_num_tokens
        self.max_num_seqs = runner.config.max_num_seqs
        self.greedy = SamplingParams(max_tokens=max_model_len, temperature=0.0)
        self.mirrors: dict[str, Request] = {}
        # the tokens each mirror was synced with last: a prefix of its request's tokens since
        self._synced: dict[str, int] = {}
        # where each mirror starts in its request's tokens (> 0: it holds a window)
        self._offset: dict[str, int] = {}

    # lifetime
    def forget(self, request_id: str) -> None:
        """Frees the request's draft KV (its request ended)."""
        mirror = self.mirrors.pop(request_id, None)
        self._synced.pop(request_id, None)
        self._offset.pop(request_id, None)
        if mirror is not None and mirror.block_ids:
            self.pool.free(mirror.block_ids)
            mirror.block_ids = []

    def keep_only(self, running: Collection[str]) -> None:
        """Frees the draft KV of every request not in `running` (finished, aborted, failed or
        preempted: a preempted one catches up again when it runs)."""
        for request_id in [r for r in self.mirrors if r not in running]:
            self.forget(request_id)

    # proposals
    def propose(self, requests: Sequence[Request], ks: Sequence[int]) -> list[list[int]]:
        """Up to ks[i] greedy draft tokens to follow requests[i]'s tokens (none for k = 0, or
        when the draft's pool cannot hold them)."""
        drafts: list[list[int]] = [[] for _ in requests]
        active = []  # (index, mirror, k)
        window = max(self.block_size, 2 * self.max_num_tokens // max(1, sum(k > 0 for k in ks)))
        for i, (request, k) in enumerate(zip(requests, ks, strict=True)):
            if k > 0 and (mirror := self._sync(request, k, window)) is not None:
                active.append((i, mirror, k))
        if not active:
            return drafts
        with torch.inference_mode():
            self._catch_up(active, drafts)
            for _ in range(max(k for _, _, k in active) - 1):
                chunks = [(m, 1) for i, m, k in active if len(drafts[i]) < k]
                sampled = self.runner.execute(chunks).sampled
                for i, mirror, k in active:
                    if len(drafts[i]) < k:
                        mirror.num_computed_tokens += 1
                        self._take(mirror, sampled, drafts[i])
        return drafts

    def _sync(self, request: Request, k: int, window: int) -> Request | None:
        """The request's mirror, holding its tokens (the last `window` of them when the mirror
        would otherwise catch up on more), with KV kept for the tokens that still agree, and
        blocks for k - 1 more; None when the pool cannot hold them."""
        tokens = request.prompt_token_ids + request.output_token_ids
        request_id = request.request_id
        mirror = self.mirrors.get(request_id)
        agree = 0
        if mirror is not None:
            offset = self._offset[request_id]
            synced = self._synced[request_id]  # tokens[offset:synced]: the mirror's first tokens
            drafted = mirror.output_token_ids  # the last proposal, after tokens[:synced]
            agree = synced
            while (agree - synced < len(drafted) and agree < len(tokens)
                   and tokens[agree] == drafted[agree - synced]):
                agree += 1
            if len(tokens) - min(offset + mirror.num_computed_tokens, agree) > window:
                self.forget(request_id)  # too far behind: restart on a window
                mirror = None
        if mirror is None:
            mirror = Request(request_id, [], self.greedy)
            self.mirrors[request_id] = mirror
            self._offset[request_id] = agree = max(0, len(tokens) - window)
        offset = self._offset[request_id]
        mirror.prompt_token_ids = tokens[offset:]
        mirror.output_token_ids = []
        mirror.num_computed_tokens = min(mirror.num_computed_tokens, agree - offset,
                                         len(tokens) - offset - 1)
        self._synced[request_id] = len(tokens)
        needed = cdiv(len(tokens) - offset + k - 1, self.block_size) - len(mirror.block_ids)
        if needed > 0:
            if not self.pool.can_allocate(needed):
                return None
            mirror.block_ids += self.pool.allocate(needed)
        return mirror

    def _catch_up(self, active: list[tuple[int, Request, int]], drafts: list[list[int]]) -> None:
        """Runs the mirrors' unseen tokens through the draft, at most the step's token budget and
        sequence count a pass, until each has scored its last token (its first draft)."""
        pending = [(i, m) for i, m, _ in active]
        while pending:
            chunks, budget = [], self.max_num_tokens
            for _, mirror in pending[:self.max_num_seqs]:
                if budget == 0:
                    break
                n = min(mirror.num_tokens - mirror.num_computed_tokens, budget)
                chunks.append((mirror, n))
                budget -= n
            sampled = self.runner.execute(chunks).sampled
            for mirror, n in chunks:
                mirror.num_computed_tokens += n
            still = []
            for i, mirror in pending:
                if mirror.num_computed_tokens == mirror.num_tokens and \
                        mirror.request_id in sampled:
                    self._take(mirror, sampled, drafts[i])
                else:
                    still.append((i, mirror))
            pending = still

    @staticmethod
    def _take(mirror: Request, sampled: dict, draft: list[int]) -> None:
        token = sampled[mirror.request_id]
        mirror.output_token_ids.append(token)
        draft.append(token)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks


def build_draft_proposer(config: InstanceConfig, draft_dir: Path, target_vocab_size: int,
                         num_blocks: int, max_model_len: int,
                         num_speculative_tokens: int = 1) -> DraftModelProposer:
    """Loads the draft model like the target (same dtype, device, attention backend, graphs) and
    gives it a KV pool of `num_blocks` blocks. Its CUDA graphs take 1 and k + 1 tokens per
    sequence (k = num_speculative_tokens: one-token passes, and catch-up passes after a step
    accepted up to k + 1 tokens). Raises ValueError for a draft whose vocabulary differs from
    the target's."""
    from engine.attention import get_attention_backend

    started = time.monotonic()
    device = torch.device(config.device)
    backend = attention_backend_name(config, device)
    model, model_config = load_model(draft_dir, dtype=config.dtype, device=device,
                                     attn_backend=get_attention_backend(backend))
    if model_config.vocab_size != target_vocab_size:
        raise ValueError(f"the draft model's vocabulary ({model_config.vocab_size} tokens) is not "
                         f"the target's ({target_vocab_size}): they must share a tokenizer")
    if model_config.max_position_embeddings < max_model_len:
        raise ValueError(f"the draft model's context ({model_config.max_position_embeddings}) is "
                         f"shorter than the served max model len ({max_model_len}): lower "
                         "--max-model-len")
    layout = kv_layout(config, model, model_config)
    runner = ModelRunner(model, allocate_kv_cache(layout, num_blocks, device),
                         runner_config(config, max_model_len, backend,
                                       (1, num_speculative_tokens + 1)), device)
    logger.info("draft model %s loaded in %.1f s; its KV cache %d blocks = %.1f MiB",
                draft_dir.name, time.monotonic() - started, num_blocks,
                num_blocks * layout.bytes_per_block / 2**20)
    return DraftModelProposer(runner, BlockPool(num_blocks, enable_prefix_cache=False),
                              max_model_len)
