"""The world's SD training, a few seconds of it: losses fall, the folder renders through the app's code paths, and
the same seed saves the same folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bp_ray.config import RenderConfig
from bp_ray.embedded.config import TinyZooConfig, WorldConfig
from bp_ray.embedded.world.samples import make_samples, world_texts
from bp_ray.embedded.world.sd_training import build_world_sd, measure_sd
from bp_ray.models.loading import load_diffusion
from bp_ray.rewards.render import render_seeds

WORLD = WorldConfig(seed=3, vae_steps=24, vae_batch_size=16, unet_steps=40, unet_batch_size=16, unet_lr=2e-3)
TINY = TinyZooConfig()
RENDER = RenderConfig(height=32, width=32, num_inference_steps=2, guidance_scale=3.0, scheduler="ddim")


def _train(folder: Path) -> dict[str, float]:
    torch.manual_seed(0)
    texts = world_texts(WORLD.seed, num_scenes=200, corpus_rows=200)
    return build_world_sd(folder, make_samples(64, WORLD.seed), WORLD, TINY, texts)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    folder = tmp_path_factory.mktemp("world_sd") / "sd"
    return folder, _train(folder)


def test_losses_fall(trained):
    _, stats = trained
    assert stats["vae_loss_last"] < stats["vae_loss_first"]
    assert stats["unet_loss_last"] < stats["unet_loss_first"]
    assert stats["vae_scaling_factor"] > 0


def test_trained_folder_renders_through_app_code(trained):
    folder, _ = trained
    pipe = load_diffusion(str(folder), device="cpu", scheduler="ddim")
    assert pipe.unet.config.sample_size == 8  # the world's 3-block VAE: 32x32 pixels, 8x8 latent
    images = render_seeds(pipe, ["a red circle", "a large blue square, dark background"], [0, 1], RENDER)
    assert images.shape == (2, 2, 32, 32, 3) and images.dtype == np.uint8

    figures = measure_sd(pipe, make_samples(6, 99), RENDER, num_seeds=1)
    assert 0 <= figures["colour_match"] <= 1 and figures["style_phrases"] == 10
    assert set(figures["style_delta"]) >= {"dark background", "glowing"}


def test_same_seed_same_folder(trained, tmp_path):
    folder, _ = trained
    again = tmp_path / "sd"
    _train(again)
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert {p for p in files if p.suffix == ".safetensors"} >= {Path("unet/diffusion_pytorch_model.safetensors")}
    for name in files:  # weights, configs, tokenizer
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name
