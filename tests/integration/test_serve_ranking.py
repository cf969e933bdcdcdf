"""Best-of-n scoring with the tiny zoo: the learned reward models (TextScorer), render + score (OnlineScorer), the
ranking, where the reward-model folder comes from, and the Scorer and Renderer deployment classes (no Serve)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import ray
from PIL import Image

from bp_ray.config_loader import load_config
from bp_ray.layout import RunLayout
from bp_ray.rewards.labeler import RewardLabeler, RewardSetup
from bp_ray.rewards.learned import LearnedReward
from bp_ray.rewards.render import render_seeds
from bp_ray.serve.model_deployments import Renderer, Scorer
from bp_ray.serve.ranking import OnlineScorer, TextScorer, online_setup, ranked, rm_folder
from tests.integration.rm_folder import untrained_rm_folder

pytestmark = pytest.mark.integration

USER = "a cat on a sofa"
CANDIDATES = ["a cat on a sofa, oil painting, highly detailed", "a cat on a sofa, photo, 35mm, soft light",
              "a cat on a sofa, anime style, vibrant colors"]


def config(tiny_models_cfg, *overrides: str):
    return load_config("tiny", [f"models.zoo_dir={tiny_models_cfg.zoo_dir}", *overrides])


@pytest.fixture(scope="module")
def rm_dir(tiny_models_cfg, tmp_path_factory):
    return untrained_rm_folder(tiny_models_cfg, tmp_path_factory.mktemp("run") / "rm", load_config("tiny").rm)


@pytest.fixture(scope="module")
def text_scorer(rm_dir):
    return TextScorer(rm_dir, alpha=0.7)


@pytest.fixture(scope="module")
def online(tiny_models_cfg):
    return OnlineScorer(online_setup(config(tiny_models_cfg, "serve.controls.online_seeds=2")))


def test_text_scores_are_the_learned_rewards_for_each_pair(text_scorer, rm_dir):
    scores = text_scorer.score([USER] * 3, CANDIDATES)
    assert len(scores) == 3 and all(set(s) == {"reward", "pickscore", "aesthetic"} for s in scores)
    assert all(math.isfinite(v) for s in scores for v in s.values())
    for s in scores:
        assert s["reward"] == pytest.approx(0.7 * s["pickscore"] + 0.3 * s["aesthetic"])
    assert text_scorer.score([USER] * 3, CANDIDATES) == scores  # deterministic
    assert len({s["reward"] for s in scores}) == 3  # the texts differ, so do their predictions
    # the reward PPO and evaluation get from the same folder, pair by pair
    learned = LearnedReward.load(rm_dir, alpha=0.7)
    assert np.allclose([s["reward"] for s in scores], learned([USER] * 3, CANDIDATES))
    # the PickScore model reads the user prompt too (low+high): another user prompt changes it, not the aesthetic
    other = text_scorer.score(["a dog in a garden"], CANDIDATES[:1])[0]
    assert other["pickscore"] != scores[0]["pickscore"] and other["aesthetic"] == pytest.approx(scores[0]["aesthetic"])
    assert text_scorer.score([], []) == []
    with pytest.raises(ValueError, match="2 prompts but 1 texts"):
        text_scorer.score([USER, USER], CANDIDATES[:1])


def test_ranked_orders_by_descending_reward_ties_by_index_nan_last(text_scorer):
    rewards = [1.0, 3.0, float("nan"), 3.0, 2.0]
    # 3.0 at 1 and 3 (index order), then 2.0 at 4, 1.0 at 0, NaN at 2
    assert ranked([{"reward": r} for r in rewards]) == [1, 3, 4, 0, 2]
    assert ranked([]) == []
    scores = text_scorer.score([USER] * 3, CANDIDATES)
    order = ranked(scores)
    assert sorted(order) == [0, 1, 2]
    assert [scores[i]["reward"] for i in order] == sorted((s["reward"] for s in scores), reverse=True)


def test_online_scores_are_the_labellers_seed_means_on_serve_render_settings(online, tiny_models_cfg):
    cfg = config(tiny_models_cfg, "serve.controls.online_seeds=2")
    assert online.seeds == [0, 1]  # rewards.seed_base .. + online_seeds - 1
    assert online.labeler.render_cfg == cfg.serve.render
    prompts = [USER, USER, "an old lighthouse at sunset"]
    texts = [*CANDIDATES[:2], "an old lighthouse at sunset, oil painting"]
    scores = online.score(prompts, texts)
    assert all(set(s) == {"reward", "pickscore", "aesthetic", "relevance"} for s in scores)
    assert all(math.isfinite(v) for s in scores for v in s.values())
    # a labeller of its own on the same setup: per-seed scores (P, S, 3), averaged over the seeds here
    labeler = RewardLabeler(RewardSetup(cfg.models, cfg.serve.render, 2, cfg.rewards), cache_path=None)
    means = labeler.label(texts, prompts).scores.mean(axis=1)
    for s, (pick, aesthetic, relevance) in zip(scores, means, strict=True):
        assert (s["pickscore"], s["aesthetic"], s["relevance"]) == pytest.approx((pick, aesthetic, relevance))
        assert s["reward"] == pytest.approx(0.7 * pick + 0.3 * aesthetic)
    assert online.score(prompts, texts) == scores  # deterministic
    assert len({s["reward"] for s in scores}) == 3
    assert [s["reward"] for s in (scores[i] for i in ranked(scores))] == sorted((s["reward"] for s in scores),
                                                                               reverse=True)
    assert online.score([], []) == []


def test_online_renders_each_candidate_as_v1_render_does(online, tiny_models_cfg):
    cfg = config(tiny_models_cfg)
    renderer = Renderer.func_or_class(cfg)
    labels = online.labeler.label(CANDIDATES[:1], [USER], keep_pixels=True)
    for s, seed in enumerate(online.seeds):
        png = np.asarray(Image.open(io.BytesIO(renderer.render(CANDIDATES[0], seed))).convert("RGB"))
        # one seed alone vs two seeds batched: at most one level of 8-bit pixels (batched kernels' last bits)
        assert np.abs(png.astype(int) - labels.pixels[0, s].astype(int)).max() <= 1


def test_renderer_passes_the_negative_prompt_and_none_is_unchanged(tiny_models_cfg):
    cfg = config(tiny_models_cfg)
    renderer = Renderer.func_or_class(cfg)
    plain = renderer.render(USER, 3)
    assert renderer.render(USER, 3, negative_prompt=None) == plain
    negative = renderer.render(USER, 3, negative_prompt="blurry, low quality")
    assert negative != plain
    # the same image as render_seeds with that negative on serve.render
    pixels = render_seeds(renderer.pipe, [USER], [3], cfg.serve.render, negative_prompt="blurry, low quality")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(negative)).convert("RGB")), pixels[0, 0])


def test_rm_folder_is_the_setting_else_the_runs_rm_output_else_none(tiny_models_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert rm_folder(config(tiny_models_cfg, f"output_dir={run}")) is None
    (run / "rm").mkdir(parents=True)
    assert rm_folder(config(tiny_models_cfg, f"output_dir={run}")) is None  # no manifest: not a finished folder
    (run / "rm" / "manifest.json").write_text("{}")
    assert rm_folder(config(tiny_models_cfg, f"output_dir={run}")) == str(RunLayout(run).stage_dir("rm"))
    relative = config(tiny_models_cfg, "output_dir=run")
    assert rm_folder(relative) == str(run / "rm")  # resolved to an absolute path
    # the setting wins, resolved; a missing folder is the loader's error to report
    chosen = config(tiny_models_cfg, f"output_dir={run}", "serve.controls.reward_model=elsewhere/rm")
    assert rm_folder(chosen) == str(tmp_path / "elsewhere" / "rm")


def test_scorer_deployment_loads_what_the_config_enables(tiny_models_cfg, rm_dir, text_scorer, online):
    run = rm_dir.parent
    ray_before = ray.is_initialized()
    texts_only = Scorer.func_or_class(config(tiny_models_cfg, f"output_dir={run}"))
    assert ray.is_initialized() == ray_before  # built outside a replica, it starts no Ray of its own
    assert texts_only.kinds() == ["reward_model"]
    assert texts_only.score("reward_model", [USER] * 3, CANDIDATES) == text_scorer.score([USER] * 3, CANDIDATES)
    with pytest.raises(ValueError, match=r"rank='online' is not available.*reward_model"):
        texts_only.score("online", [USER], CANDIDATES[:1])
    both = Scorer.func_or_class(config(tiny_models_cfg, f"output_dir={run / 'elsewhere'}",
                                      f"serve.controls.reward_model={rm_dir}", "serve.controls.online_rank=true"))
    assert both.kinds() == ["reward_model", "online"]
    assert both.score("online", [USER] * 2, CANDIDATES[:2]) == online.score([USER] * 2, CANDIDATES[:2])
    nothing = Scorer.func_or_class(config(tiny_models_cfg, f"output_dir={run / 'elsewhere'}"))
    assert nothing.kinds() == []
    with pytest.raises(ValueError, match=r"rank='reward_model' is not available.*nothing"):
        nothing.score("reward_model", [USER], CANDIDATES[:1])
