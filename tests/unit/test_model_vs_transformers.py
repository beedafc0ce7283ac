"""Our model over the paged KV cache against transformers' reference implementation, on tiny
random checkpoints of every supported architecture."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata, TorchAttentionBackend
from engine.model import load_model

transformers = pytest.importorskip("transformers")

BLOCK_SIZE = 16
NUM_BLOCKS = 12
PROMPT_LEN = 40
ATOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def models(request, tiny_models):
    """(ours, config, transformers model) for one architecture, both float32 on CPU."""
    path = tiny_models[request.param]
    ours, config = load_model(path, dtype="float32", attn_backend=TorchAttentionBackend())
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return ours, config, reference.eval()


def prompt(config, length: int = PROMPT_LEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, config.vocab_size, (length,), generator=torch.Generator().manual_seed(seed))


def new_kv_cache(config) -> torch.Tensor:
    return torch.zeros(config.num_layers, NUM_BLOCKS, 2, BLOCK_SIZE, config.num_kv_heads,
                       config.head_dim)


def step(model, kv_cache, seqs) -> torch.Tensor:
    """Runs one flat batch. seqs: list of (new_token_ids, num_cached_tokens, block_ids).
    Returns float32 logits for every new token, [T, vocab]."""
    slots, positions, query_start_loc, seq_lens = [], [], [0], []
    for token_ids, num_cached, blocks in seqs:
        seq_positions = range(num_cached, num_cached + len(token_ids))
        positions.extend(seq_positions)
        slots.extend(blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in seq_positions)
        query_start_loc.append(query_start_loc[-1] + len(token_ids))
        seq_lens.append(num_cached + len(token_ids))
    width = max(len(blocks) for _, _, blocks in seqs)
    block_tables = torch.tensor([blocks + [0] * (width - len(blocks)) for _, _, blocks in seqs],
                                dtype=torch.int32)
    meta = AttentionMetadata(torch.tensor(slots), block_tables, seq_lens, query_start_loc)
    input_ids = torch.cat([token_ids for token_ids, _, _ in seqs])
    with torch.inference_mode():
        return model.compute_logits(model(input_ids, torch.tensor(positions), kv_cache, meta))


def reference_logits(reference, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return reference(token_ids.unsqueeze(0)).logits[0].float()


def test_parameter_names_and_rotary_match(models):
    ours, _, reference = models
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert torch.equal(ours.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_prefill_matches_transformers(models):
    ours, config, reference = models
    ids = prompt(config)
    logits = step(ours, new_kv_cache(config), [(ids, 0, list(range(NUM_BLOCKS)))])
    expected = reference_logits(reference, ids)
    assert logits.dtype == torch.float32 and logits.shape == (PROMPT_LEN, config.vocab_size)
    assert (logits - expected).abs().max().item() < ATOL


def test_chunked_prefill_then_decode(models):
    ours, config, reference = models
    ids, blocks = prompt(config), list(range(NUM_BLOCKS))
    full = step(ours, new_kv_cache(config), [(ids, 0, blocks)])
    kv_cache = new_kv_cache(config)
    step(ours, kv_cache, [(ids[:23], 0, blocks)])
    second = step(ours, kv_cache, [(ids[23:], 23, blocks)])
    torch.testing.assert_close(second, full[23:], atol=1e-5, rtol=0)
    assert torch.equal(second.argmax(-1), full[23:].argmax(-1))
    # decode one token on top of the chunked cache
    next_id = second[-1].argmax().view(1)
    decoded = step(ours, kv_cache, [(next_id, PROMPT_LEN, blocks)])
    expected = reference_logits(reference, torch.cat([ids, next_id]))[-1:]
    assert (decoded - expected).abs().max().item() < ATOL


def test_batched_sequences_with_scattered_blocks(models):
    ours, config, reference = models
    first, second = prompt(config, 30, seed=1), prompt(config, 12, seed=2)
    kv_cache = new_kv_cache(config)
    step(ours, kv_cache, [(first[:20], 0, [7, 3])])
    logits = step(ours, kv_cache, [(first[20:], 20, [7, 3]), (second, 0, [5])])
    assert (logits[:10] - reference_logits(reference, first)[20:]).abs().max().item() < ATOL
    assert (logits[10:] - reference_logits(reference, second)).abs().max().item() < ATOL


def test_greedy_decode_matches_generate(models):
    ours, config, reference = models
    ids, blocks, num_new = prompt(config), list(range(NUM_BLOCKS)), 8
    kv_cache = new_kv_cache(config)
    generated = [step(ours, kv_cache, [(ids, 0, blocks)])[-1].argmax().item()]
    while len(generated) < num_new:
        token = torch.tensor([generated[-1]])
        logits = step(ours, kv_cache, [(token, PROMPT_LEN + len(generated) - 1, blocks)])
        generated.append(logits[-1].argmax().item())
    with torch.inference_mode():
        output = reference.generate(ids.unsqueeze(0), max_new_tokens=num_new, do_sample=False,
                                    attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long))
    expected = output[0, PROMPT_LEN:].tolist()  # may stop early at an eos token
    assert expected and generated[:len(expected)] == expected


def test_bfloat16_load(tiny_models):
    ours, config = load_model(tiny_models["llama"], dtype="bfloat16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    logits = step(ours, torch.zeros_like(new_kv_cache(config), dtype=torch.bfloat16),
                  [(prompt(config), 0, list(range(NUM_BLOCKS)))])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_tokenizer_loads_in_transformers(tiny_models):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    text = "Grüße aus 東京 🙂 and plain English."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token_id == 0
