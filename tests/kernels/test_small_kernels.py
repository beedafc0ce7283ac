"""The small Triton kernels (KV-cache write, RMSNorm, rotary, SiLU-and-mul) against their torch
references in kernels.reference, and the new references against the model code they stand for.

Without a GPU the kernels run in Triton's interpreter on the CPU (tests/kernels/conftest.py),
in float32 and float16 only (the interpreter's bfloat16 arithmetic is wrong). Shapes are small
and include non-power-of-2 sizes (hidden 100, head_dim 24) to exercise the masks.

Tolerances: data movement (cache write, the residual sum) must be bit-exact. Everything else
is float32 math that may differ from torch's in reduction order, rsqrt/exp implementation or
FMA contraction: float32 results within rtol 1e-5 (a few ulp), float16 results within one
float16 ulp (1e-3 relative), since a float32 difference can tip a value across a float16
rounding boundary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from engine.model.rotary import RotaryEmbedding  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.activation import silu_and_mul  # noqa: E402
from kernels.cache import write_kv_cache  # noqa: E402
from kernels.norm import fused_add_rms_norm, rms_norm  # noqa: E402
from kernels.rotary import apply_rotary  # noqa: E402

DTYPES = (torch.float32, torch.float16)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture
def randn(kernel_device):
    """randn(*shape, dtype=float32, seed=0): seeded normal samples on the kernel device."""
    def sample(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=generator).to(device=kernel_device, dtype=dtype)
    return sample


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The module docstring's tolerances: a few float32 ulp, or one float16 ulp."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = 1e-5 if expected.dtype == torch.float32 else 1e-3
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# --- KV-cache write -----------------------------------------------------------------------

def random_slots(num_tokens: int, num_slots: int, padding: list[int], dtype: torch.dtype,
                 device: str) -> torch.Tensor:
    """Distinct random slots, with -1 at the `padding` token indices."""
    generator = torch.Generator().manual_seed(1)
    slots = torch.randperm(num_slots, generator=generator)[:num_tokens]
    slots[padding] = -1
    return slots.to(device=device, dtype=dtype)


@pytest.mark.parametrize("num_tokens, num_kv_heads, head_dim, block_size, num_blocks, padding", [
    (7, 2, 24, 4, 5, [2, 6]),
    (5, 3, 16, 16, 2, []),
    (4, 1, 64, 8, 3, [0, 1, 2, 3]),  # all padding: nothing written
])
@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize("slot_dtype", (torch.int64, torch.int32))
def test_write_kv_cache_matches_reference(randn, kernel_device, num_tokens, num_kv_heads,
                                          head_dim, block_size, num_blocks, padding,
                                          cache_dtype, slot_dtype):
    # k/v in float32 while the cache may be float16: the cast is part of the contract
    k = randn(num_tokens, num_kv_heads, head_dim, seed=1)
    v = randn(num_tokens, num_kv_heads, head_dim, seed=2)
    kv_layer = randn(num_blocks, 2, block_size, num_kv_heads, head_dim, dtype=cache_dtype, seed=3)
    slots = random_slots(num_tokens, num_blocks * block_size, padding, slot_dtype, kernel_device)
    expected = kv_layer.clone()
    reference.write_kv_cache(k, v, expected, slots)

    assert write_kv_cache(k, v, kv_layer, slots) is None
    assert torch.equal(kv_layer, expected)  # bitwise, untouched slots included


def test_write_kv_cache_from_fused_qkv_views(randn, kernel_device):
    """k and v as strided slices of one fused QKV output, as a fused projection gives them."""
    num_tokens, num_heads, num_kv_heads, head_dim, block_size = 6, 4, 2, 24, 4
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size, dtype=torch.float16)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    kv_layer = torch.zeros(3, 2, block_size, num_kv_heads, head_dim, dtype=torch.float16,
                           device=kernel_device)
    slots = random_slots(num_tokens, 3 * block_size, [4], torch.int64, kernel_device)
    expected = kv_layer.clone()
    reference.write_kv_cache(k.contiguous(), v.contiguous(), expected, slots)

    write_kv_cache(k, v, kv_layer, slots)
    assert torch.equal(kv_layer, expected)


def test_reference_write_kv_cache_skips_padding(randn, kernel_device):
    block_size = 4
    k, v = randn(3, 2, 8, seed=1), randn(3, 2, 8, seed=2)
    kv_layer = randn(2, 2, block_size, 2, 8, seed=3)
    expected = kv_layer.clone()
    for token, slot in ((0, 5), (2, 2)):
        expected[slot // block_size, 0, slot % block_size] = k[token]
        expected[slot // block_size, 1, slot % block_size] = v[token]

    reference.write_kv_cache(k, v, kv_layer, torch.tensor([5, -1, 2], device=kernel_device))
    assert torch.equal(kv_layer, expected)  # in particular, slot -1 did not hit the last slot


# --- RMSNorm ------------------------------------------------------------------------------

NORM_SHAPES = [(7, 64), (5, 100), (2, 3, 24), (1, 96)]


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(randn, shape, dtype):
    x = randn(*shape, dtype=dtype, seed=1) * 3
    weight = randn(shape[-1], dtype=dtype, seed=2)
    assert_close(rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))


def test_rms_norm_rounds_before_the_weight(randn):
    """float16: almost every element is bitwise the reference's. Applying the weight before
    rounding to x's dtype, the other common convention, differs on about a quarter of them."""
    x = randn(64, 100, dtype=torch.float16, seed=1) * 3
    weight = randn(100, dtype=torch.float16, seed=2)
    mismatched = rms_norm(x, weight, 1e-6) != reference.rms_norm(x, weight, 1e-6)
    assert mismatched.float().mean().item() < 0.01


def test_rms_norm_weight_dtype_promotes_like_reference(randn):
    """A float32 weight on float16 x: the result is float32, as torch's promotion makes it."""
    x, weight = randn(4, 100, dtype=torch.float16, seed=1), randn(100, seed=2)
    assert_close(rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5))


def test_rms_norm_writes_into_out(randn):
    x, weight = randn(3, 4, 24, dtype=torch.float16, seed=1), randn(24, dtype=torch.float16)
    out = torch.empty_like(x)
    assert rms_norm(x, weight, 1e-6, out=out) is out
    assert_close(out, reference.rms_norm(x, weight, 1e-6))


def test_rms_norm_of_strided_heads(randn):
    """Per-head q norm (Qwen3) on q sliced from a fused QKV output."""
    q = randn(5, 8 * 24, seed=1)[:, :4 * 24].view(5, 4, 24)
    weight = randn(24, seed=2)
    assert_close(rms_norm(q, weight, 1e-6), reference.rms_norm(q, weight, 1e-6))


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_reference(randn, shape, dtype):
    x, residual = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    weight = randn(shape[-1], dtype=dtype, seed=3)
    x_before, residual_before = x.clone(), residual.clone()
    expected_normed, expected_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-6)

    normed, residual_out = fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(residual_out, expected_residual)  # one exact sum, rounded once
    assert_close(normed, expected_normed)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # not in place


def test_reference_fused_add_rms_norm_is_add_then_norm(randn):
    x = randn(4, 100, dtype=torch.float16, seed=1)
    residual = randn(4, 100, dtype=torch.float16, seed=2)
    weight = randn(100, dtype=torch.float16, seed=3)
    normed, residual_out = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(residual_out, x + residual)
    assert torch.equal(normed, reference.rms_norm(x + residual, weight, 1e-6))


# --- Rotary -------------------------------------------------------------------------------

ROTARY_CASES = [  # num_tokens, num_heads, num_kv_heads, head_dim, rope_scaling
    (5, 4, 2, 24, None),
    (3, 6, 6, 64, None),
    (4, 3, 1, 32, LLAMA3_SCALING),
]
MAX_POSITION = 300


def rotary_embedding(head_dim: int, rope_scaling: dict | None, device: str) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, 10000.0, rope_scaling).to(device)


def random_positions(num_tokens: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    return torch.randint(0, MAX_POSITION, (num_tokens,), generator=generator).to(device, dtype)


@pytest.mark.parametrize("num_tokens, num_heads, num_kv_heads, head_dim, rope_scaling",
                         ROTARY_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("positions_dtype", (torch.int64, torch.int32))
def test_apply_rotary_matches_reference(randn, kernel_device, num_tokens, num_heads,
                                        num_kv_heads, head_dim, rope_scaling, dtype,
                                        positions_dtype):
    q = randn(num_tokens, num_heads, head_dim, dtype=dtype, seed=1)
    k = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, seed=2)
    positions = random_positions(num_tokens, positions_dtype, kernel_device)
    inv_freq = rotary_embedding(head_dim, rope_scaling, kernel_device).inv_freq
    cache = reference.build_cos_sin_cache(inv_freq, MAX_POSITION)
    expected_q, expected_k = reference.apply_rotary_cached(q, k, positions, cache)

    assert apply_rotary(q, k, positions, cache) is None  # in place
    assert_close(q, expected_q)
    assert_close(k, expected_k)


def test_apply_rotary_in_place_on_fused_qkv_views(randn, kernel_device):
    """q and k rotated in place inside a fused QKV buffer; v, after them, stays unchanged."""
    num_tokens, num_heads, num_kv_heads, head_dim = 5, 4, 2, 24
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size, dtype=torch.float16)
    v_before = qkv[:, q_size + kv_size:].clone()
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    positions = random_positions(num_tokens, torch.int64, kernel_device)
    inv_freq = rotary_embedding(head_dim, None, kernel_device).inv_freq
    cache = reference.build_cos_sin_cache(inv_freq, MAX_POSITION)
    expected_q, expected_k = reference.apply_rotary_cached(q, k, positions, cache)

    apply_rotary(q, k, positions, cache)
    assert_close(qkv[:, :q_size], expected_q.reshape(num_tokens, q_size))
    assert_close(qkv[:, q_size:q_size + kv_size], expected_k.reshape(num_tokens, kv_size))
    assert torch.equal(qkv[:, q_size + kv_size:], v_before)


@pytest.mark.parametrize("head_dim, rope_scaling", [(24, None), (32, LLAMA3_SCALING),
                                                    (64, {"rope_type": "linear", "factor": 2.0})])
def test_cos_sin_cache_matches_rotary_embedding(randn, kernel_device, head_dim, rope_scaling):
    """A gathered table row is RotaryEmbedding's float32 cos/sin (same operations, so bitwise
    equal in practice; 1e-6 allows for a last-ulp difference between vectorized and scalar
    cos/sin), and the cached reference rotation is the model's rotation with them."""
    rotary = rotary_embedding(head_dim, rope_scaling, kernel_device)
    positions = random_positions(9, torch.int64, kernel_device)
    cos, sin = rotary(positions, torch.float32)
    cache = reference.build_cos_sin_cache(rotary.inv_freq, MAX_POSITION)
    assert cache.shape == (MAX_POSITION, head_dim) and cache.dtype == torch.float32
    cached_cos, cached_sin = cache[positions].chunk(2, dim=-1)
    torch.testing.assert_close(torch.cat((cached_cos, cached_cos), dim=-1), cos,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat((cached_sin, cached_sin), dim=-1), sin,
                               rtol=0, atol=1e-6)

    q, k = randn(9, 4, head_dim, seed=1), randn(9, 2, head_dim, seed=2)
    rotated_q, rotated_k = reference.apply_rotary_cached(q, k, positions, cache)
    assert_close(rotated_q, reference.apply_rotary(q, cos, sin))
    assert_close(rotated_k, reference.apply_rotary(k, cos, sin))


# --- SiLU and mul -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 2 * 24), (3, 2 * 100), (2, 2 * 1100), (2, 3, 2 * 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(randn, shape, dtype):
    x = randn(*shape, dtype=dtype, seed=1) * 4  # reach silu's flat and linear parts
    assert_close(silu_and_mul(x), reference.silu_and_mul(x))


def test_silu_and_mul_writes_into_out(randn, kernel_device):
    x = randn(4, 2 * 100, dtype=torch.float16, seed=1)
    out = torch.empty(4, 100, dtype=torch.float16, device=kernel_device)
    assert silu_and_mul(x, out=out) is out
    assert_close(out, reference.silu_and_mul(x))


def test_reference_silu_and_mul_against_the_model_mlp(randn):
    """float32: the model's `F.silu(gate) * up` exactly. bfloat16 (torch only, no kernel):
    within about one ulp of it (the model rounds twice, the reference once)."""
    x = randn(8, 2 * 100, seed=1) * 4
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(reference.silu_and_mul(x), F.silu(gate) * up)

    x16 = x.to(torch.bfloat16)
    gate16, up16 = x16.chunk(2, dim=-1)
    torch.testing.assert_close(reference.silu_and_mul(x16), F.silu(gate16) * up16,
                               rtol=2 ** -7, atol=1e-2)
