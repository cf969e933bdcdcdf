"""What `pipeline --dry-run` shrinks, and what it keeps."""

import pytest

from bp_ray.config_loader import available_presets, load_config
from bp_ray.dry_run import lm_shape, shrink


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_shrinks_to_one_step_on_a_cpu(preset):
    cfg = load_config(preset, ["data.source=corpus"])
    small = shrink(cfg, gpus=0)
    for stage in ("sft", "rm", "ppo"):
        resources = getattr(small, stage).resources
        assert resources.num_workers == 1 and not resources.use_gpu
    assert (small.sft.stop_after_step, small.rm.stop_after_step, small.ppo.total_steps) == (1, 1, 1)
    assert small.rewards.max_prompts == 1 and small.eval.num_prompts == 1
    assert small.models.device == "cpu" and small.ppo.actor_gpus == 0 and small.serve.num_gpus_per_replica == 0
    # what decides memory stays: models, image size, seeds, sequence limits
    assert small.models.policy == cfg.models.policy and small.data.num_seeds == cfg.data.num_seeds
    assert (small.data.render.height, small.sft.max_length) == (cfg.data.render.height, cfg.sft.max_length)
    assert small.data.render.num_inference_steps == 1


def test_on_a_cluster_every_worker_gets_an_example():
    cfg = load_config("paper", ["data.source=corpus"])
    small = shrink(cfg, gpus=16)
    assert small.sft.resources.num_workers == 8 and small.sft.resources.use_gpu
    assert small.sft.batch_size == small.rm.batch_size == small.ppo.rollout_batch_size == 8
    assert small.rewards.max_prompts == 8 and small.data.corpus_rows == 128
    assert small.ppo.actor_gpus == cfg.ppo.actor_gpus


def test_lm_shape_reports_the_real_depth_of_a_model_built_with_fewer_layers(tmp_path):
    import json

    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(vocab_size=1000, hidden_size=64, n_layer=2, n_head=4)).save_pretrained(tmp_path)
    built = lm_shape(tmp_path)
    assert (built.layers, built.hidden, built.vocab) == (2, 64, 1000)
    (tmp_path / "zoo.json").write_text(json.dumps({"full_layers": 24}))
    real = lm_shape(tmp_path)
    per_layer = 12 * 64 * 64 + 13 * 64  # BLOOM's block: attention and MLP weights and biases, two layer norms
    assert real.layers == 24 and real.params == built.params + 22 * per_layer
    assert lm_shape(tmp_path, real=False) == built
