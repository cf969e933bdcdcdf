"""Rendering and reward labels with the tiny zoo: determinism, scores, cache, the Ray Data stage, the actor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bp_ray.config import PipelineConfig
from bp_ray.config_loader import load_config
from bp_ray.data import columns as C
from bp_ray.rewards.labeler import RewardLabeler, RewardSetup
from bp_ray.rewards.pipeline import read_pairs, run_reward_labels
from bp_ray.rewards.render import render_seeds
from bp_ray.rewards.scoring import SCORE_NAMES

pytestmark = pytest.mark.integration

PROMPTS = ["a cat on a sofa", "an old lighthouse at sunset, oil painting, highly detailed"]


def config(tiny_models_cfg, *overrides: str):
    return load_config("tiny", [f"models.zoo_dir={tiny_models_cfg.zoo_dir}", "data.num_seeds=3", *overrides])


def labelling(cfg: PipelineConfig) -> RewardSetup:
    return RewardSetup.for_labels(cfg.data, cfg.rewards, cfg.models)


def setup(tiny_models_cfg, *overrides: str) -> RewardSetup:
    return labelling(config(tiny_models_cfg, *overrides))


def label(cfg: PipelineConfig, pairs: Path, out: Path) -> dict:
    return run_reward_labels(cfg.data, cfg.rewards, cfg.models, cfg.cluster, pairs, out)


@pytest.fixture(scope="module")
def labeler(tiny_models_cfg):
    return RewardLabeler(setup(tiny_models_cfg), cache_path=None)


def test_batched_seeds_match_single_renders_and_reruns_are_bit_exact(labeler):
    batched = render_seeds(labeler.pipe, PROMPTS, labeler.seeds, labeler.render_cfg)
    assert batched.shape == (2, 3, 32, 32, 3) and batched.dtype == np.uint8
    assert np.array_equal(batched, render_seeds(labeler.pipe, PROMPTS, labeler.seeds, labeler.render_cfg))
    for p, prompt in enumerate(PROMPTS):
        for s, seed in enumerate(labeler.seeds):
            alone = render_seeds(labeler.pipe, [prompt], [seed], labeler.render_cfg)[0, 0]
            # batched kernels differ in the last float bits: at most one level of 8-bit pixels
            assert np.abs(alone.astype(int) - batched[p, s].astype(int)).max() <= 1
    assert not np.array_equal(batched[0, 0], batched[0, 1])  # seeds differ


def test_scores_have_the_expected_shapes_and_ranges(labeler):
    labels = labeler.label(PROMPTS, ["a cat", "a lighthouse"])
    assert labels.scores.shape == (2, 3, 3) and np.isfinite(labels.scores).all()
    pick, _, relevance = (labels.scores[:, :, i] for i in range(3))
    scale = labeler.scorers.pickscore.model.logit_scale.exp().item()
    assert (np.abs(pick) <= scale + 1e-4).all()  # logit_scale x cosine
    assert (np.abs(relevance) <= 1 + 1e-5).all()  # a cosine
    assert labels.rendered.all()


def test_pickscore_text_can_be_the_intent(tiny_models_cfg, labeler):
    by_intent = RewardLabeler(setup(tiny_models_cfg, "rewards.pickscore_text=intent"), cache_path=None)
    intents = ["a cat", "a lighthouse"]
    own = labeler.label(PROMPTS, intents).scores
    other = by_intent.label(PROMPTS, intents).scores
    assert np.allclose(own[:, :, 1:], other[:, :, 1:])  # aesthetic and relevance unchanged
    assert not np.allclose(own[:, :, 0], other[:, :, 0])  # PickScore now compares with the intent


def test_the_cache_serves_a_rerun_and_is_invalidated_by_settings(tiny_models_cfg, tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    first = RewardLabeler(setup(tiny_models_cfg), cache)
    cold = first.label(PROMPTS, PROMPTS)
    assert cold.rendered.all()
    warm = RewardLabeler(setup(tiny_models_cfg), cache).label(PROMPTS, PROMPTS)  # a new worker, same file
    assert not warm.rendered.any() and np.allclose(warm.scores, cold.scores)
    partly = RewardLabeler(setup(tiny_models_cfg), cache).label([*PROMPTS, "a dragon"], [*PROMPTS, "a dragon"])
    assert partly.rendered.tolist() == [False, False, True]
    for change in ("data.render.num_inference_steps=5", "data.render.guidance_scale=3.0",
                   "data.render.height=64", "models.zoo.tiny.clip_layers=1", "data.num_seeds=4"):
        changed = RewardLabeler(setup(tiny_models_cfg, change), cache)
        if change.startswith("models.zoo.tiny"):
            assert changed.key.diffusion_model != first.key.diffusion_model  # another model fingerprint
        # num_seeds=4 adds one new seed: the prompt is rendered again, all its seeds in one call
        assert changed.label(PROMPTS[:1], PROMPTS[:1]).rendered.all(), change


def pairs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir(parents=True)
    pd.DataFrame({C.PAIR_ID: ["p1", "p2", "p3"], C.LOW: ["a cat", "a dog", "a cat"],
                  C.HIGH: ["a cat, oil painting, 8k", "a dog, digital art", "a cat, watercolor"]}
                 ).to_parquet(folder / "part-00000.parquet")
    return folder


@pytest.mark.parametrize("fused", [False, True])
def test_label_stage_writes_per_seed_scores_and_a_rerun_hits_the_cache(ray_session, tiny_models_cfg, tmp_path,
                                                                       fused):
    cfg = config(tiny_models_cfg, f"rewards.fused={str(fused).lower()}", "rewards.keep_images=true")
    manifest = label(cfg, pairs_dir(tmp_path), tmp_path / "rewards")
    labels = pd.read_parquet(tmp_path / "rewards" / "part-00000.parquet")
    assert len(labels) == 6 and set(labels["role"]) == {"low", "high"}
    # "a cat" is the low prompt of p1 and p3 with the same intent: rendered once
    assert manifest["unique_prompts"] == 5 and manifest["prompts_rendered"] == 5
    assert manifest["prompts_from_cache"] == 0
    for name in SCORE_NAMES:
        per_seed = np.stack(labels[name].to_numpy())
        assert per_seed.shape == (6, 3)
        assert np.allclose(labels[f"{name}_mean"], per_seed.mean(axis=1))
        assert np.allclose(labels[f"{name}_std"], per_seed.std(axis=1))
    assert np.allclose(labels["reward"], 0.7 * labels["pickscore_mean"] + 0.3 * labels["aesthetic_mean"])
    assert {"diffusion_model", "height", "num_inference_steps", "scheduler", "seeds"} <= set(labels.columns)
    assert len(list((tmp_path / "rewards" / "images").glob("*.webp"))) == 5 * 3
    again = label(cfg, pairs_dir(tmp_path / "again"), tmp_path / "rewards")
    assert again["prompts_rendered"] == 0 and again["prompts_from_cache"] == 5
    rerun = pd.read_parquet(tmp_path / "rewards" / "part-00000.parquet")
    assert np.allclose(np.stack(rerun["pickscore"].to_numpy()), np.stack(labels["pickscore"].to_numpy()))
    assert json.loads((tmp_path / "rewards" / "manifest.json").read_text())["fused"] is fused


def test_reward_actor_serves_concurrent_callers(ray_session, tiny_models_cfg, tmp_path):
    import ray

    from bp_ray.rewards.service import reward_service

    # A wide batching window: callers that arrive within it share a batch even on a loaded machine.
    cfg = config(tiny_models_cfg, "rewards.service_batch_wait_s=1.0")
    service = reward_service(labelling(cfg), cfg.data.scorer_pool, str(tmp_path / "cache.sqlite"), num_gpus=0)
    try:
        requests = [[f"a {animal} on a sofa"] for animal in ("cat", "dog", "fox", "owl")] + [PROMPTS]
        answers = ray.get([service.score.remote(r, r) for r in requests])  # in flight together
        expected = RewardLabeler(labelling(cfg), cache_path=None)
        for request, answer in zip(requests, answers, strict=True):
            scores = expected.label(request, request).scores
            want = 0.7 * scores[:, :, 0].mean(axis=1) + 0.3 * scores[:, :, 1].mean(axis=1)
            # batched renders may differ from single ones by one 8-bit pixel level (see docs/rewards.md), hence 1e-3
            assert np.allclose(answer, want, atol=1e-3)
        stats = ray.get(service.stats.remote())
        assert stats["calls"] == 5 and stats["batches"] < 5  # concurrent callers shared batches
    finally:
        ray.kill(service)  # it holds a CPU: a leaked actor would starve later tests of resources


def test_missing_pairs_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `bp-ray data generate` first"):
        read_pairs(tmp_path)
