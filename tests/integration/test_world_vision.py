"""The three vision roles trained briefly in the miniature world: each loss falls, each trained model beats its
random-init self (or chance) on held-out scenes, and each saved folder loads through the app's own loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bp_ray.embedded import tiny_zoo
from bp_ray.embedded.config import TinyZooConfig, WorldConfig
from bp_ray.embedded.world import vision_training as vt
from bp_ray.embedded.world.samples import heldout_seed, make_samples, world_texts

pytestmark = pytest.mark.integration

SEED = 0


@pytest.fixture(scope="module")
def world_data():
    """Small train / held-out sample sets (the build uses thousands of scenes; seconds matter here)."""
    return make_samples(400, SEED), make_samples(60, heldout_seed(SEED))


@pytest.fixture(scope="module")
def random_zoo(tmp_path_factory) -> Path:
    """Random-init blip / clip / aesthetic folders from the tiny builders, as the world zoo starts from."""
    root = tmp_path_factory.mktemp("random_zoo")
    tiny, texts = TinyZooConfig(), world_texts(SEED, num_scenes=300, corpus_rows=300)
    for offset, (role, build) in enumerate((("blip", tiny_zoo.build_tiny_blip), ("clip", tiny_zoo.build_tiny_clip),
                                            ("aesthetic", tiny_zoo.build_tiny_aesthetic))):
        torch.manual_seed(offset)
        build(root / role, tiny, texts)
    return root


def _trained_copy(random_zoo: Path, role: str, tmp_path: Path) -> Path:
    folder = tmp_path / role
    shutil.copytree(random_zoo / role, folder)
    return folder


def test_captioner_learns_colours(random_zoo, world_data, tmp_path):
    from bp_ray.data.captions import caption_images
    from bp_ray.models.loading import load_captioner

    train, heldout = world_data
    folder = _trained_copy(random_zoo, "blip", tmp_path)
    stats = vt.train_world_captioner(folder, train, WorldConfig(seed=SEED, captioner_steps=1000))
    assert stats["last_loss"] < 0.5 * stats["first_loss"]
    assert stats["shape_pretrain_last_loss"] < stats["shape_pretrain_first_loss"]
    before, after = vt.measure_captioner(random_zoo / "blip", heldout), vt.measure_captioner(folder, heldout)
    assert after["colours"] >= before["colours"] + 0.2, (before, after)
    model, processor = load_captioner(str(folder), device="cpu")  # the app's path, as the data stage uses it
    caption = caption_images(model, processor, vt._pil(heldout.plain_images[:1]), max_new_tokens=30)[0]
    assert caption.startswith(("a ", "an ")), caption


def test_clip_retrieves_far_above_chance(random_zoo, world_data, tmp_path):
    from bp_ray.models.loading import load_clip_scorer

    train, heldout = world_data
    folder = _trained_copy(random_zoo, "clip", tmp_path)
    stats = vt.train_world_clip(folder, train, WorldConfig(seed=SEED, clip_steps=400))
    assert stats["last_loss"] < 0.7 * stats["first_loss"]
    before, after = vt.measure_clip(random_zoo / "clip", heldout), vt.measure_clip(folder, heldout)
    assert after["plain/top1"] >= 3 * after["plain/chance"], after
    assert after["plain/top1"] >= before["plain/top1"] + 0.1, (before, after)
    pick = load_clip_scorer(str(folder), device="cpu", use_logit_scale=True)  # the PickScore role
    images = vt._pil(heldout.images[:4])
    assert pick.score(images, heldout.detailed[:4]).shape == (4,)


def test_aesthetic_ranks_like_the_ground_truth(random_zoo, world_data, tmp_path):
    from bp_ray.models.aesthetic import load_aesthetic_head

    train, heldout = world_data
    folder = _trained_copy(random_zoo, "aesthetic", tmp_path)
    stats = vt.train_world_aesthetic(folder, train, WorldConfig(seed=SEED, aesthetic_steps=300))
    assert stats["last_loss"] < 0.8 * stats["first_loss"]
    before, after = vt.measure_aesthetic(random_zoo / "aesthetic", heldout), vt.measure_aesthetic(folder, heldout)
    assert after["spearman"] >= max(0.4, before["spearman"] + 0.2), (before, after)
    assert "miniature world" in load_aesthetic_head(folder)[1].head_source


def test_training_is_deterministic_for_a_seed(random_zoo, world_data, tmp_path):
    train, _ = world_data
    world = WorldConfig(seed=SEED, aesthetic_steps=5, aesthetic_batch_size=16)
    weights = []
    for run in ("a", "b"):
        folder = _trained_copy(random_zoo, "aesthetic", tmp_path / run)
        vt.train_world_aesthetic(folder, train, world)
        weights.append((folder / "open_clip.safetensors").read_bytes())
    assert weights[0] == weights[1]
