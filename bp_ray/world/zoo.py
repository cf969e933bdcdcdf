"""The world zoo: the tiny zoo's architectures, each trained briefly in the miniature world.

Same roles, same formats and loaders as the tiny zoo (`world:<role>` in a config instead of `tiny:<role>`), so
every stage runs unchanged; only the weights now mean something. Deterministic for a seed, built once, cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from bp_ray.config import ModelsConfig, TinyZooConfig, WorldConfig
from bp_ray.models import tiny_zoo
from bp_ray.models.tiny_zoo import ZOO_ROLES, ZooSummary, build_zoo, default_zoo_dir, is_current

logger = logging.getLogger(__name__)

WORLD_PREFIX = "world:"
BUILDER_VERSION = 2
"""Bump when a trainer changes what it writes, so cached world zoos are rebuilt."""


def world_key(tiny: TinyZooConfig, world: WorldConfig) -> str:
    payload = json.dumps({"tiny": asdict(tiny), "world": asdict(world), "builder": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def world_zoo_dir(models_cfg: ModelsConfig) -> Path:
    return default_zoo_dir(models_cfg) / "world"


def ensure_world_zoo(models_cfg: ModelsConfig) -> Path:
    """Path of an up-to-date world zoo, building (and training) it if missing or built from another config."""
    root = world_zoo_dir(models_cfg)
    if not is_current(root, world_key(models_cfg.tiny, models_cfg.world)):
        build_world_zoo(root, models_cfg.tiny, models_cfg.world)
    return root


def _count(folder: Path) -> int:
    """Parameters stored in a model folder's safetensors files."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            names = handle.keys()  # a safetensors handle is not iterable
            total += sum(prod(handle.get_slice(name).get_shape()) for name in names)
    return total


def build_world_zoo(root: Path, tiny: TinyZooConfig, world: WorldConfig, force: bool = False) -> ZooSummary:
    """Build the tiny architectures and train each in the world; zoo.json records every model's time and stats."""
    from bp_ray.world.lm_training import train_world_lm
    from bp_ray.world.samples import heldout_seed, make_samples, world_texts
    from bp_ray.world.sd_training import build_world_sd
    from bp_ray.world.vision_training import train_world_aesthetic, train_world_captioner, train_world_clip

    def build(staging: Path) -> dict:
        start = time.perf_counter()
        texts = world_texts(world.seed)
        samples = make_samples(world.train_scenes, world.seed, tiny.image_size)
        lm_heldout = world_texts(heldout_seed(world.seed), num_scenes=200, corpus_rows=200)
        seconds = {"samples": time.perf_counter() - start}
        stats: dict[str, dict] = {}

        def tiny_then(builder: Callable[[Path, TinyZooConfig, list[str]], int],
                      train: Callable[[Path], dict]) -> Callable[[Path], dict]:
            def make(out: Path) -> dict:
                builder(out, tiny, texts)
                return train(out)
            return make

        steps = [
            ("bloom", tiny_then(tiny_zoo.build_tiny_bloom, lambda out: train_world_lm(out, texts, world, lm_heldout))),
            ("blip", tiny_then(tiny_zoo.build_tiny_blip, lambda out: train_world_captioner(out, samples, world))),
            ("pickscore", tiny_then(tiny_zoo.build_tiny_clip, lambda out: train_world_clip(out, samples, world))),
            ("aesthetic", tiny_then(tiny_zoo.build_tiny_aesthetic,
                                    lambda out: train_world_aesthetic(out, samples, world))),
            # the world SD has its own VAE and UNet architecture, so it is built by its trainer
            ("sd", lambda out: build_world_sd(out, samples, world, tiny, texts)),
        ]
        for offset, (role, make) in enumerate(steps):
            begin = time.perf_counter()
            torch.manual_seed(world.seed * 1000 + offset)
            logger.info("world zoo: building and training %s", role)
            stats[role] = make(staging / role)
            seconds[role] = time.perf_counter() - begin
            logger.info("world zoo: %s trained in %.1f s", role, seconds[role])
        # One contrastive CLIP serves both image-text roles, as one CLIP would on a real cluster.
        shutil.copytree(staging / "pickscore", staging / "clip")
        parameters = {role: _count(staging / role) for role in ZOO_ROLES}
        return {"key": world_key(tiny, world), "tiny": asdict(tiny), "world": asdict(world),
                "builder": BUILDER_VERSION, "parameters": parameters,
                "seconds": {k: round(v, 2) for k, v in seconds.items()}, "training": stats}

    return build_zoo(root, lambda: is_current(root, world_key(tiny, world)), build, force)
