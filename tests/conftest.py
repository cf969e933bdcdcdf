"""Shared fixtures: paths to ../shared data (tests skip cleanly where absent) and an isolated zoo cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Keep third-party chatter and thread oversubscription down on 2-core machines.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a clean skip when this machine does not have it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present on this machine")
    return path


@pytest.fixture(scope="session")
def tiny_models_cfg(tmp_path_factory):
    """ModelsConfig of the tiny preset with the zoo built once per test session in a private folder."""
    from bp_ray.config_loader import load_config
    from bp_ray.models.tiny_zoo import ensure_tiny_zoo

    cfg = load_config("tiny").models
    cfg.zoo_dir = str(tmp_path_factory.mktemp("zoo"))
    ensure_tiny_zoo(cfg)
    return cfg


QUICK_WORLD = {"train_scenes": 300, "heldout_scenes": 40, "lm_steps": 40, "captioner_steps": 20, "clip_steps": 20,
               "aesthetic_steps": 20, "vae_steps": 20, "unet_steps": 30}
"""World budgets that build a whole world zoo in well under a minute: enough to prove every trainer runs and
learns; the real budgets are measured by benchmarks/world_quality.py."""


@pytest.fixture(scope="session")
def world_models_cfg(tmp_path_factory):
    """ModelsConfig of the world preset with a quickly trained world zoo, built once per session."""
    from bp_ray.config_loader import load_config
    from bp_ray.world.zoo import ensure_world_zoo

    cfg = load_config("world", [f"models.world.{key}={value}" for key, value in QUICK_WORLD.items()]).models
    cfg.zoo_dir = str(tmp_path_factory.mktemp("world-zoo"))
    ensure_world_zoo(cfg)
    return cfg
