"""Fused q/k/v and gate/up projections (what the Triton path runs): the same greedy tokens and,
in float32, the same logits up to matmul rounding; the checkpoint's tensors come back
unchanged under their own names."""

from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.engine_loop import build_reference, generate, recorded_logits
from tests.reference import prompt_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_projections_compute_the_same_model(tiny_models, arch):
    plain = build_reference(tiny_models[arch])
    fused = build_reference(tiny_models[arch])
    before = {name: tensor.clone() for name, tensor in fused.runner.model.state_dict().items()}
    fused.runner.model.fuse_projections()
    layer = fused.runner.model.model.layers[0]
    assert hasattr(layer.self_attn, "qkv_proj") and not hasattr(layer.self_attn, "q_proj")
    assert hasattr(layer.mlp, "gate_up_proj") and not hasattr(layer.mlp, "up_proj")

    after = fused.runner.model.checkpoint_tensors()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)

    prompt = prompt_ids(3, 21, 2000)
    greedy = SamplingParams(8, temperature=0.0, ignore_eos=True)
    with recorded_logits(plain.runner.model) as want, recorded_logits(fused.runner.model) as got:
        assert generate(fused, prompt, greedy) == generate(plain, prompt, greedy)
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=1e-5)
