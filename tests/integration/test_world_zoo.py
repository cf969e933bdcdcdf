"""`bp-ray models build-world`: every role is built, trained, recorded and loadable through `world:` specs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bp_ray.embedded.tiny_zoo import ZOO_ROLES
from tests.conftest import QUICK_WORLD


def test_world_zoo_trains_every_role_and_loads_through_world_specs(world_models_cfg):
    from bp_ray.embedded.world.zoo import ensure_world_zoo, world_zoo_dir
    from bp_ray.models.loading import load_captioner, load_causal_lm, load_clip_relevance, resolve_model

    root = world_zoo_dir(world_models_cfg)
    manifest = json.loads((root / "zoo.json").read_text())
    assert set(manifest["parameters"]) == set(ZOO_ROLES)
    assert all(manifest["parameters"][role] > 0 for role in ZOO_ROLES)
    assert {"bloom", "blip", "pickscore", "aesthetic", "sd"} <= set(manifest["seconds"])
    # the aesthetic predictor also learned from the world SD's renders: one per training scene (6000 > 300)
    assert manifest["training"]["aesthetic"]["sd_images"] == QUICK_WORLD["train_scenes"]
    lm = manifest["training"]["bloom"]
    assert lm["heldout_loss_after"] < lm["heldout_loss_before"] - 1.0  # 40 steps already learn the words
    before = (root / "zoo.json").stat().st_mtime_ns
    assert ensure_world_zoo(world_models_cfg) == root and (root / "zoo.json").stat().st_mtime_ns == before  # cached
    assert resolve_model("world:sd", world_models_cfg) == str(root / "sd")

    model, tokenizer = load_causal_lm("world:bloom", world_models_cfg, device="cpu")
    assert tokenizer.padding_side == "left" and model.config.model_type == "bloom"
    captioner, _ = load_captioner("world:blip", world_models_cfg, device="cpu")
    assert captioner.config.model_type == "blip"
    scorer = load_clip_relevance(world_models_cfg, device="cpu")
    assert scorer is not None
    # One contrastive CLIP serves both image-text roles.
    for name in ("model.safetensors", "config.json"):
        assert (root / "clip" / name).read_bytes() == (root / "pickscore" / name).read_bytes()


def test_world_zoo_rebuilds_when_its_config_changes(world_models_cfg, tmp_path):
    from dataclasses import replace

    from bp_ray.embedded.tiny_zoo import is_current
    from bp_ray.embedded.world.zoo import world_key, world_zoo_dir

    root, tiny, world = world_zoo_dir(world_models_cfg), world_models_cfg.zoo["tiny"], world_models_cfg.zoo["world"]
    assert is_current(root, world_key(tiny, world))
    assert not is_current(root, world_key(tiny, replace(world, lm_steps=41)))
    assert not is_current(Path(tmp_path), world_key(tiny, world))


def test_world_zoo_build_is_deterministic_for_a_seed(world_models_cfg, tmp_path):
    """Weights, configs and tokenizers come out byte for byte the same from a second build."""
    from bp_ray.embedded.world.zoo import build_world_zoo, file_digests, world_zoo_dir

    assert build_world_zoo(tmp_path / "world", world_models_cfg.zoo["tiny"], world_models_cfg.zoo["world"]).built
    assert file_digests(tmp_path / "world") == file_digests(world_zoo_dir(world_models_cfg))


def test_world_zoo_retrains_only_the_roles_asked_for(world_models_cfg, tmp_path):
    import shutil
    from dataclasses import replace

    from bp_ray.embedded.tiny_zoo import is_current
    from bp_ray.embedded.world.zoo import build_world_zoo, file_digests, world_key, world_zoo_dir

    source, root = world_zoo_dir(world_models_cfg), tmp_path / "world"
    shutil.copytree(source, root)
    world = replace(world_models_cfg.zoo["world"], aesthetic_steps=QUICK_WORLD["aesthetic_steps"] + 1)
    assert build_world_zoo(root, world_models_cfg.zoo["tiny"], world, roles=("aesthetic",)).built
    for role in ("bloom", "blip", "pickscore", "clip", "sd"):
        assert file_digests(root / role) == file_digests(source / role), role
    assert file_digests(root / "aesthetic") != file_digests(source / "aesthetic")
    manifest = json.loads((root / "zoo.json").read_text())
    assert manifest["training"]["aesthetic"]["steps"] == QUICK_WORLD["aesthetic_steps"] + 1
    assert manifest["training"]["sd"] == json.loads((source / "zoo.json").read_text())["training"]["sd"]
    assert is_current(root, world_key(world_models_cfg.zoo["tiny"], world))
    with pytest.raises(ValueError, match="unknown world role"):
        build_world_zoo(root, world_models_cfg.zoo["tiny"], world, roles=("aesthetics",))
    with pytest.raises(FileNotFoundError, match="build every role first"):
        build_world_zoo(tmp_path / "none", world_models_cfg.zoo["tiny"], world, roles=("aesthetic",))


def test_world_truth_scores_judge_renders_against_the_request():
    from bp_ray.embedded import WORLD_TRUTH_COLUMNS as WORLD_METRICS
    from bp_ray.embedded.world.scenes import render_text
    from bp_ray.embedded.world.truth import world_truth_scores

    good = render_text("a red circle, dark background, high contrast, sharp, smooth, centered", 1)
    bad = render_text("a blue square, low contrast, blurry, grainy", 1)
    pixels = np.stack([np.stack([good, bad])] * 2)  # (P=2, S=2, H, W, 3)
    scores = world_truth_scores(pixels, ["a red circle", "a cat on a sofa"])
    assert scores.shape == (2, 2, len(WORLD_METRICS))
    assert scores[0, 0, 0] > scores[0, 1, 0] + 3  # true aesthetic: the crisp render far above the murky one
    assert scores[0, 0, 1] == 1.0 and scores[0, 1, 1] == 0.0  # red asked: red drawn, then blue drawn
    assert np.isnan(scores[1, :, 1]).all()  # a request naming no coloured shape has no colour verdict


@pytest.mark.integration
def test_world_evaluation_reports_the_ground_truth(ray_session, world_models_cfg, tmp_path):
    """The world preset's evaluation: world prompts, world tags, and ground truth for every image, grid or not."""
    from bp_ray.config_loader import load_config
    from bp_ray.embedded.world.scenes import STYLE_WORDS
    from bp_ray.eval.prompts import embedded_eval_prompts
    from bp_ray.eval.run import run_evaluation

    cfg = load_config("world", [f"models.zoo_dir={world_models_cfg.zoo_dir}", "eval.num_prompts=5",
                                "eval.num_seeds=2", "eval.grid_prompts=2", "eval.human_prompts=3", "eval.batch_size=2",
                                *[f"models.zoo.world.{k}={v}" for k, v in QUICK_WORLD.items()]])
    run_evaluation(cfg.eval, cfg.sft, cfg.data, cfg.rewards, cfg.models, cfg.cluster, tmp_path,
                   systems=["original", "tags"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metrics"][-4:] == ["true_aesthetic", "colour_match", "shape_match", "count_match"]
    assert set(results["tags"]) <= set(STYLE_WORDS)
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == 2 * 5 * 2 and scores["true_aesthetic"].between(0, 10).all()
    for check in ("colour_match", "shape_match", "count_match"):  # every world prompt names a coloured shape
        assert set(scores[check].unique()) <= {0.0, 1.0}
    rewrites = [json.loads(line) for line in (tmp_path / "rewrites.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rewrites] == embedded_eval_prompts(cfg.data)[:5]
    # the images of the first 3 prompts (the human study's; the grid shows 2), every system and seed, no more
    assert len(list((tmp_path / "images").rglob("*.png"))) == 3 * 2 * 2
    for row in results["table"]:
        assert 0 <= row["true_aesthetic_mean"] <= 10 and 0 <= row["colour_match_mean"] <= 1


@pytest.mark.slow  # 2 min, a release check: make test-all; a seed's build being deterministic is tested above
def test_shipped_world_zoo_is_what_build_world_builds(tmp_path):
    """The shipped zoo is the default config's build: its key matches, and its LM rebuilt alone here learns what the
    shipped one learned (every role, ~45 min: python benchmarks/world_quality.py --check-shipped). Bytes match only
    on the CPU that built it: another CPU's float kernels add in another order, and 1000 steps amplify the last bit."""
    from bp_ray.config_loader import load_config
    from bp_ray.embedded.tiny_zoo import is_current
    from bp_ray.embedded.world.zoo import SHIPPED_ZOO, build_world_roles, world_key

    models = load_config("world").models
    assert is_current(SHIPPED_ZOO, world_key(models.zoo["tiny"], models.zoo["world"]))
    stats, _ = build_world_roles(tmp_path, models.zoo["tiny"], models.zoo["world"], roles=("bloom",))
    shipped = json.loads((SHIPPED_ZOO / "zoo.json").read_text())["training"]["bloom"]
    assert stats["bloom"]["heldout_loss_before"] == pytest.approx(shipped["heldout_loss_before"], rel=1e-4)
    assert stats["bloom"]["heldout_loss_after"] == pytest.approx(shipped["heldout_loss_after"], rel=0.03)
    def settings(folder: Path, name: str) -> dict:
        # the library that wrote a file records its version there: a fresh install may bring a newer one
        return {k: v for k, v in json.loads((folder / name).read_text()).items() if k != "transformers_version"}

    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert settings(tmp_path / "bloom", name) == settings(SHIPPED_ZOO / "bloom", name), name


def test_first_use_of_the_default_world_zoo_copies_the_shipped_one(tmp_path):
    from bp_ray.config_loader import load_config
    from bp_ray.embedded.world.zoo import SHIPPED_ZOO, ensure_world_zoo, file_digests

    models = load_config("world", [f"models.zoo_dir={tmp_path}"]).models
    root = ensure_world_zoo(models)
    assert root == tmp_path / "world" and file_digests(root) == file_digests(SHIPPED_ZOO)
    assert json.loads((root / "zoo.json").read_text())["copied_from"] == str(SHIPPED_ZOO)
