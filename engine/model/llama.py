"""One decoder-only model for Llama, Mistral, Qwen2 and Qwen3 over the paged KV cache.

The four differ only in projection biases, Qwen3's per-head q/k RMSNorm (applied before
rotary), tied embeddings and an explicit head_dim; ModelConfig carries those switches.
Module and parameter names equal the Hugging Face checkpoint names, so loading is a direct
name match:

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}   (bias per config)
    model.layers.{i}.self_attn.{q,k}_norm.weight              (Qwen3)
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight
    lm_head.weight                                            (shared with embed when tied)

Batches are flat: the step's tokens of every sequence concatenated, described by
AttentionMetadata. Nothing here runs under inference_mode or torch.compile; callers decide.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.model.config import ModelConfig
from engine.model.rotary import RotaryEmbedding
from engine.ops import KernelOps


class RMSNorm(nn.Module):
    """RMSNorm; given a residual, first adds it (fused): returns (normed, x + residual)."""

    def __init__(self, dim: int, eps: float, ops: KernelOps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def fuse_linears(module: nn.Module, parts: tuple[str, ...], fused: str) -> None:
    """Replaces module's Linear children `parts` (same input, outputs stacked in this order) by
    one Linear `fused` whose weight (and bias) is their concatenation, and forgets the parts:
    one matmul reads all their weights. `module.fused_parts[fused]` records the parts and their
    output sizes (see CausalLM.checkpoint_tensors)."""
    linears = [getattr(module, name) for name in parts]
    weight = torch.cat([linear.weight for linear in linears])
    bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    for name in parts:
        delattr(module, name)
    setattr(module, fused, out)
    module.fused_parts = {**getattr(module, "fused_parts", {}),
                          fused: (parts, [linear.out_features for linear in linears])}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, attn_backend: AttentionBackend):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.attn_backend = attn_backend
        self.ops = attn_backend.ops
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, self.ops)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, self.ops)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: Any, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """x: [T, hidden]; rope: the step's `ops.rotary_inputs`. Writes this step's K/V into
        kv_cache[layer_idx] (via the backend)."""
        num_tokens = x.shape[0]
        if hasattr(self, "qkv_proj"):  # fused: q, k, v are column views of one matmul's output
            q, k, v = self.qkv_proj(x).split(self.fused_parts["qkv_proj"][1], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.apply_rotary(q, k, rope)
        out = self.attn_backend.forward(q, k, v, kv_cache[self.layer_idx], meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: KernelOps):
        super().__init__()
        self.ops = ops
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(self.ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, attn_backend: AttentionBackend):
        super().__init__()
        ops = attn_backend.ops
        self.self_attn = Attention(config, layer_idx, attn_backend)
        self.mlp = MLP(config, ops)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: Any,
                kv_cache: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream carried apart (the add is fused into the next norm): the layer's
        output is hidden + residual, exactly the unfused `h = h + attn(norm(h))` sums."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, attn_backend)
                                    for i in range(config.num_layers))
        self.ops = attn_backend.ops
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, self.ops)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                          config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.ops.rotary_inputs(self.rotary_emb, positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope, kv_cache, meta)
        return self.norm(hidden, residual)[0]


class CausalLM(nn.Module):
    """Decoder plus LM head. Construct through engine.model.load_model to get weights."""

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, attn_backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] long, the step's tokens of all sequences concatenated.

        kv_cache: [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]; the K/V of
        every token is written at meta.slot_mapping in each layer (mutated). Returns the final
        normed hidden states [T, hidden_size] in the model dtype.
        """
        return self.model(input_ids, positions, kv_cache, meta)

    def fuse_projections(self) -> None:
        """q/k/v into one qkv_proj and gate/up into one gate_up_proj in every layer (fewer,
        larger matmuls: what a batch-1 decode step, bound by reading weights, wants). The
        parameter names change; `checkpoint_tensors` gives the checkpoint's names back."""
        for layer in self.model.layers:
            fuse_linears(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
            fuse_linears(layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj")

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The state dict under the checkpoint's (Hugging Face) names; fused weights are split
        back into views (no copy)."""
        tensors = self.state_dict()
        for prefix, module in self.named_modules():
            for fused, (parts, sizes) in getattr(module, "fused_parts", {}).items():
                for kind in ("weight", "bias"):
                    tensor = tensors.pop(f"{prefix}.{fused}.{kind}", None)
                    if tensor is None:
                        continue
                    for part, piece in zip(parts, tensor.split(sizes, dim=0)):
                        tensors[f"{prefix}.{part}.{kind}"] = piece
        return tensors

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden_size] (usually each sequence's last position). Returns [N, vocab]
        float32; the matmul runs in the model dtype, as in transformers."""
        return self.lm_head(hidden).float()
