"""The KV block pool: a free list, reference counts and the prefix cache.

Block accounting (one pool per instance):

    block id:   0    1    2    3    4    5    6    7
    ref_count:  2    1    0    0    1    0    0    0
    hash:       h0   h1   h2   -    -    h5   -    -
                |    |    |              |
                |    |    '--------------'---- free, but still a prefix-cache hit until reused
                |    '------------------------ owned by one request
                '----------------------------- shared by two requests (a prefix hit)

    free queue (LRU first): 2 -> 3 -> 5 -> 6 -> 7
    allocate() pops from the front; a popped block's hash is forgotten (evicted).
    free() pushes blocks whose count reaches 0 to the back, so cached blocks stay hits longest.

Prefix hashes chain: hash(block i) = H(hash(block i-1), tokens of block i), with a fixed root
seed shared by every tier (a per-process seed silently breaks cross-tier prefix matching). Only
full blocks are hashed.

Not thread-safe: one engine thread owns the pool; other threads go through that thread.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

PREFIX_HASH_SEED = b"tandem-prefix-cache-v1"


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained 16-byte hash of one full block; parent_hash None means the first block."""
    h = hashlib.blake2b(digest_size=16, key=PREFIX_HASH_SEED)
    h.update(parent_hash or b"\0" * 16)
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return h.digest()


def prefix_block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Hashes of every full block of token_ids, in order."""
    hashes: list[bytes] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


class OutOfBlocksError(RuntimeError):
    """Raised by allocate() when the pool cannot supply the blocks; check can_allocate first."""


class BlockPool:
    """Hands out block ids. Mutates only itself."""

    def __init__(self, num_blocks: int, enable_prefix_cache: bool = True):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_cache = enable_prefix_cache
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    # accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Takes num_blocks free blocks (ref count 1 each), evicting their cached hashes."""
        if not self.can_allocate(num_blocks):
            raise OutOfBlocksError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            self._forget_hash(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def share(self, block_ids: Sequence[int]) -> None:
        """Takes one more reference on each of these held blocks (another sequence reads them;
        each holder frees its own reference)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise RuntimeError(f"sharing KV block {block_id}, which is free")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drops one reference from each block; blocks reaching 0 join the back of the free queue.

        Blocks are freed in reverse so a sequence's tail is evicted before its shared prefix.
        """
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            if count <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None

    # prefix cache
    def lookup_prefix(self, block_hashes: Sequence[bytes]) -> list[int]:
        """Longest run of cached blocks for these hashes. Read-only: takes no reference, counts
        nothing, leaves the LRU order as it is."""
        hits: list[int] = []
        if self.enable_prefix_cache:
            for block_hash in block_hashes:
                block_id = self._cached.get(block_hash)
                if block_id is None:
                    break
                hits.append(block_id)
        return hits

    def match_prefix(self, block_hashes: Sequence[bytes], num_queried: int | None = None) -> list[int]:
        """Longest run of cached blocks for these hashes; takes a reference on each (as
        allocate) and counts a query of num_queried blocks (default: all of block_hashes)."""
        hits = self.lookup_prefix(block_hashes)
        self.num_prefix_queries += len(block_hashes) if num_queried is None else num_queried
        self.num_prefix_hits += len(hits)
        for block_id in hits:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1
        return hits

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Registers a full, computed block under its chained hash (first writer wins)."""
        if not self.enable_prefix_cache or self._block_hash[block_id] is not None:
            return
        if block_hash not in self._cached:
            self._cached[block_hash] = block_id
            self._block_hash[block_id] = block_hash

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def _forget_hash(self, block_id: int) -> None:
        block_hash = self._block_hash[block_id]
        if block_hash is not None:
            self._block_hash[block_id] = None
            if self._cached.get(block_hash) == block_id:
                del self._cached[block_hash]
