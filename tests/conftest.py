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
    from bp_ray.embedded.tiny_zoo import ensure_tiny_zoo

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
    from bp_ray.embedded.world.zoo import ensure_world_zoo

    cfg = load_config("world", [f"models.zoo.world.{key}={value}" for key, value in QUICK_WORLD.items()]).models
    cfg.zoo_dir = str(tmp_path_factory.mktemp("world-zoo"))
    ensure_world_zoo(cfg)
    return cfg


# Test files that take minutes, longest first (serial --durations on 2 cores). `make test` hands whole files to two
# processes in collection order (pytest -n 2 --dist loadfile), so these go first and the many short files fill in
# around them; collected last, the longest file ran alone for a quarter of an hour at the end.
LONG_FILES = ("test_job_submit.py", "test_ppo.py", "test_world_intent.py", "test_sft.py", "test_multinode.py",
              "test_world_zoo.py", "test_data_pipeline.py", "test_train_recovery.py", "test_reward_model.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: each file's tests keep their order
