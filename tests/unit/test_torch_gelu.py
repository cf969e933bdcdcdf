"""BLOOM loads with torch's tanh GELU in place of its Python GeLU: the same logits and gradients."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from transformers.models.bloom.modeling_bloom import BloomGelu

from bp_ray.models.loading import load_causal_lm, resolve_model, use_torch_gelu


def test_a_loaded_bloom_has_torch_gelu_and_the_same_logits_and_gradients(tiny_models_cfg):
    swapped, _ = load_causal_lm(tiny_models_cfg.policy, tiny_models_cfg, device="cpu")
    original = AutoModelForCausalLM.from_pretrained(resolve_model(tiny_models_cfg.policy, tiny_models_cfg)).eval()
    assert any(isinstance(m, BloomGelu) for m in original.modules())
    assert not any(isinstance(m, BloomGelu) for m in swapped.modules())
    assert sum(isinstance(m, torch.nn.GELU) for m in swapped.modules()) == original.config.n_layer
    ids = torch.randint(5, 500, (3, 20))
    losses = [model(input_ids=ids, labels=ids).loss for model in (original, swapped)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(original.named_parameters(), swapped.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert use_torch_gelu(swapped) == 0  # nothing left to swap
