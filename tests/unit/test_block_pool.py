import pytest

from engine.block_pool import BlockPool, OutOfBlocksError, hash_block_tokens, prefix_block_hashes


def test_allocate_free_and_refcounts():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3 and pool.num_free_blocks == 1
    assert not pool.can_allocate(2)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(2)
    pool.free(blocks)
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(blocks[:1])


# Pinned digests (computed once): a changed seed, token encoding or chaining breaks prefix
# matching between tiers and across versions, and a per-process seed (Python's hash()) would
# give other values in every process.
FIRST_BLOCK_0_15 = "32dc603447b3a3f451e0e9271fd15c22"   # hash_block_tokens(None, 0..15)
SECOND_BLOCK_16_31 = "baa57443e730ff10909f52cf461494c5"  # its child: tokens 16..31


def test_block_hash_is_fixed_and_process_independent():
    tokens = list(range(40))
    assert hash_block_tokens(None, tokens[:16]).hex() == FIRST_BLOCK_0_15
    assert [h.hex() for h in prefix_block_hashes(tokens, 16)] == [FIRST_BLOCK_0_15,
                                                                   SECOND_BLOCK_16_31]
    assert hash_block_tokens(None, tuple(tokens[:16])) == hash_block_tokens(None, tokens[:16])
    assert len(hash_block_tokens(None, [1, 2, 3])) == 16


def test_block_hash_depends_on_parent_and_every_token():
    block = list(range(100, 116))
    root = hash_block_tokens(None, block)
    parent_a, parent_b = hash_block_tokens(None, [1] * 16), hash_block_tokens(None, [2] * 16)
    assert hash_block_tokens(parent_a, block) != hash_block_tokens(parent_b, block)
    assert hash_block_tokens(parent_a, block) != root
    for i in range(16):  # one token changed, anywhere in the block
        changed = block[:i] + [block[i] + 1] + block[i + 1:]
        assert hash_block_tokens(None, changed) != root, i
    assert hash_block_tokens(None, block[::-1]) != root  # order matters
    assert hash_block_tokens(None, [70000] + block[1:]) != root  # ids above 16 bits count
    # token ids are not confused with each other's bytes: 256 is not (0, 1) or (1, 0)
    assert hash_block_tokens(None, [256, 0]) != hash_block_tokens(None, [0, 1])
    digests = {hash_block_tokens(None, [t] * 16) for t in range(1000)}
    assert len(digests) == 1000


def test_prefix_hashes_chain_and_skip_the_partial_block():
    tokens = list(range(1000, 1056))  # 3 full blocks and 8 tokens
    hashes = prefix_block_hashes(tokens, 16)
    assert len(hashes) == 3  # the partial last block is not hashed
    parent = None
    for i, block_hash in enumerate(hashes):  # chained: each hash is over its parent's
        assert block_hash == hash_block_tokens(parent, tokens[16 * i:16 * (i + 1)])
        parent = block_hash
    # tokens in the partial block change nothing; completing it adds one hash
    assert prefix_block_hashes(tokens[:48] + [1, 2, 3], 16) == hashes
    assert prefix_block_hashes(tokens + list(range(8)), 16)[:3] == hashes
    assert len(prefix_block_hashes(tokens + list(range(8)), 16)) == 4
    assert prefix_block_hashes(tokens[:15], 16) == []
    # a prefix's hashes are a prefix of the hashes (what prefix matching relies on) ...
    assert prefix_block_hashes(tokens[:32], 16) == hashes[:2]
    # ... and a change in block 1 changes blocks 1 and 2 (the chain) but not block 0
    changed = prefix_block_hashes(tokens[:20] + [7] + tokens[21:], 16)
    assert changed[0] == hashes[0] and changed[1] != hashes[1] and changed[2] != hashes[2]
    # the same block after a different prefix hashes differently
    other = prefix_block_hashes([9] * 16 + tokens[16:32], 16)
    assert other[1] != hashes[1]
    # other block sizes split (and chain) the same tokens differently
    assert prefix_block_hashes(tokens, 8)[1] == hash_block_tokens(
        hash_block_tokens(None, tokens[:8]), tokens[8:16])


def test_prefix_match_takes_references_and_survives_free_until_evicted():
    pool = BlockPool(3)
    hashes = prefix_block_hashes(list(range(32)), 16)
    blocks = pool.allocate(2)
    for block_id, block_hash in zip(blocks, hashes):
        pool.cache_block(block_id, block_hash)
    assert pool.match_prefix(hashes) == blocks  # shared: ref count 2
    assert pool.ref_count(blocks[0]) == 2
    pool.free(blocks)
    pool.free(blocks)
    assert pool.num_free_blocks == 3
    assert pool.match_prefix(hashes) == blocks  # still cached while free
    pool.free(blocks)
    pool.allocate(3)  # reuses every block: hashes evicted
    assert pool.match_prefix(hashes) == []


def test_disabled_prefix_cache_never_hits():
    pool = BlockPool(2, enable_prefix_cache=False)
    hashes = prefix_block_hashes(list(range(16)), 16)
    block = pool.allocate(1)
    pool.cache_block(block[0], hashes[0])
    assert pool.match_prefix(hashes) == []
