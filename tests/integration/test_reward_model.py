"""Reward models on Ray Train + DeepSpeed: they beat predicting the mean, and the combined reward loads from disk."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bp_ray.config_loader import load_config
from bp_ray.models.reward_heads import HEAD_FILE
from bp_ray.rewards.learned import LearnedReward
from bp_ray.train.reward import run_rm
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
