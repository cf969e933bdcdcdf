"""PPO on Ray Train + DeepSpeed with reference and reward actors: on the tiny world it raises the held-out reward
over the SFT policy while the KL stays near its target; a stopped run resumes and a killed worker is replaced."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bp_ray.config import load_config
from bp_ray.train.ppo import run_ppo
from bp_ray.train.reward import run_rm
from bp_ray.train.sft import run_sft
from tests.integration.train_inputs import corpus_pairs, synthetic_labels

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(ray_session, tiny_models_cfg, tmp_path_factory) -> dict[str, Path]:
    """Pairs, an SFT policy and reward models whose labels reward tags and words (a learnable signal)."""
    root = tmp_path_factory.mktemp("ppo-inputs")
    pairs = corpus_pairs(root / "data", rows=800)
    base = [f"models.zoo_dir={tiny_models_cfg.zoo_dir}"]
    run_sft(load_config("tiny", [*base, "sft.epochs=3", "sft.lr=3e-3", "sft.checkpoint_every=1000",
                                 "sft.eval_fraction=0.1"]), pairs, root / "sft")
    run_rm(load_config("tiny", [*base, "rm.heads=shared_backbone", "rm.epochs=4", "rm.lr=1e-3",
                                "rm.checkpoint_every=1000"]), synthetic_labels(pairs, root / "rewards"), root / "rm")
    return {"pairs": pairs, "sft": root / "sft", "rm": root / "rm"}


def ppo_cfg(zoo_dir: str, *overrides: str):
    return load_config("tiny", [f"models.zoo_dir={zoo_dir}", "sft.eval_fraction=0.1", *overrides])


def test_ppo_raises_the_held_out_reward_over_sft_within_the_kl_budget(trained, tiny_models_cfg, tmp_path):
    cfg = ppo_cfg(tiny_models_cfg.zoo_dir, "ppo.total_steps=30", "ppo.checkpoint_every=10")
    manifest = run_ppo(cfg, trained["pairs"], trained["sft"], trained["rm"], tmp_path / "ppo")
    before, after = manifest["initial_eval"]["eval/reward"], manifest["final_metrics"]["eval/reward"]
    metrics = pd.read_csv(tmp_path / "ppo" / "metrics" / "metrics.csv")
    late_kl = metrics["kl"].iloc[-10:].mean()
    print(f"held-out reward (greedy): SFT {before:.3f} -> PPO {after:.3f}; KL over the last 10 iterations "
          f"{late_kl:.3f} (target {cfg.ppo.kl_target}), coefficient {manifest['kl_coef']:.4f}")
    assert after > before + 0.1
    assert late_kl < 3 * cfg.ppo.kl_target
    assert manifest["complete"] and (tmp_path / "ppo" / "model" / "model.safetensors").exists()
    assert (tmp_path / "ppo" / "critic" / "model.safetensors").exists()
    logged = {"reward/combined", "reward/baseline", "reward/relevance", "guard/repetition", "guard/words_over_cap",
              "kl", "kl_coef", "entropy", "response_tokens", "clipfrac", "loss/value", "explained_variance",
              "perf/samples_per_s"}
    assert logged <= set(metrics.columns)
    assert metrics["step"].tolist() == list(range(1, 31))
