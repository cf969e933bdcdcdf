"""The per-GPU memory formula against hand-computed values."""

import pytest

from bp_ray import memory_estimate as M

BLOOM_1B1 = M.LMShape(params=1_065_314_304, layers=24, hidden=1536, vocab=250_880)


@pytest.mark.parametrize(("stage", "expected_per_param"), [
    (0, 2 + 2 + 12),          # nothing partitioned
    (1, 2 + 2 + 12 / 8),      # optimizer states over 8 workers
    (2, 2 + (2 + 12) / 8),    # and gradients
    (3, (2 + 2 + 12) / 8),    # and weights
])
def test_zero_stages_partition_what_the_zero_paper_says(stage, expected_per_param):
    assert M.model_state_bytes(1000, "bf16", stage, 8) == pytest.approx(1000 * expected_per_param)


def test_fp32_training_costs_16_bytes_per_parameter_unpartitioned():
    assert M.model_state_bytes(1000, "fp32", 2, 1) == 16_000


def test_bloom_sft_step_on_the_paper_preset():
    # ZeRO-2, bf16, 8 workers: 2Ψ + 14Ψ/8 = 3.75 bytes per parameter
    states = M.model_state_bytes(BLOOM_1B1.params, "bf16", 2, 8)
    assert states == pytest.approx(BLOOM_1B1.params * 3.75)
    # micro-batch 2 of 384 tokens: 34·s·b·h·L bytes of activations; one 256-position chunk of float32 logits + grad
    activations = 34 * 384 * 2 * 1536 * 24
    logits = 2 * 2 * 256 * 250_880 * 4
    assert M.training_bytes(BLOOM_1B1, 1, "bf16", 2, 8, 2, 384, 256) == pytest.approx(states + activations + logits)
    # unchunked: the micro-batch's bf16 logits, their float32 copy and its gradient, 1.8 GiB
    assert logits < 2 * 384 * 250_880 * (2 + 4 + 4)


def test_kv_cache_and_scaled_activations():
    assert M.kv_cache_bytes(BLOOM_1B1, 16, 512, "bf16") == 2 * 24 * 16 * 512 * 1536 * 2
    # 3 GB measured, 1 GB of it weights: 2 GB of float32 activations -> 1 GB at fp16, x2 for twice the batch
    assert M.scaled_activations(3e9, 1e9, 4, 8, "float32", "float16") == pytest.approx(2e9)


def test_checkpoint_holds_weights_and_optimizer_states():
    # PPO's policy and critic at the paper preset: 2 × 1.07 B × (2 + 12) bytes = 27.8 GiB per checkpoint
    assert 2 * M.checkpoint_bytes(BLOOM_1B1.params, "bf16") == pytest.approx(2 * BLOOM_1B1.params * 14)
    assert M.checkpoint_bytes(1000, "fp32") == 12_000
