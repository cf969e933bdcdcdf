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

import numpy as np
import torch

from bp_ray.config import ModelsConfig
from bp_ray.embedded import tiny_zoo
from bp_ray.embedded.config import TinyZooConfig, WorldConfig
from bp_ray.embedded.tiny_zoo import ZOO_ROLES, is_current
from bp_ray.models.model_cache import MANIFEST, ZooSummary, build_zoo, default_zoo_dir

logger = logging.getLogger(__name__)

WORLD_PREFIX = "world:"
BUILDER_VERSION = 3
"""Bump when a trainer changes what it writes, so cached world zoos are rebuilt."""


def world_key(tiny: TinyZooConfig, world: WorldConfig) -> str:
    payload = json.dumps({"tiny": asdict(tiny), "world": asdict(world), "builder": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


SHIPPED_ZOO = Path(__file__).resolve().parent.parent / "resources" / "zoo" / "world"
"""The world zoo of the default config, as `bp-ray models build-world` builds it (tested: same bytes on the CPU
that built it, same losses on any), shipped so that a fresh clone runs the main job without training first."""


def world_zoo_dir(models_cfg: ModelsConfig) -> Path:
    return default_zoo_dir(models_cfg) / "world"


def ensure_world_zoo(models_cfg: ModelsConfig) -> Path:
    """Path of an up-to-date world zoo: the cache; else the shipped zoo copied there when it was built from the same
    config; else built (and trained) now."""
    root = world_zoo_dir(models_cfg)
    key = world_key(models_cfg.zoo["tiny"], models_cfg.zoo["world"])
    if not is_current(root, key):
        if is_current(SHIPPED_ZOO, key):
            build_zoo(root, lambda: is_current(root, key), lambda staging: _copy_shipped(staging))
        else:
            build_world_zoo(root, models_cfg.zoo["tiny"], models_cfg.zoo["world"])
    return root


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under a zoo folder but its zoo.json (which records build times), by relative path:
    two builds of the same config must agree on all of them."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != MANIFEST}


def _copy_shipped(staging: Path) -> dict:
    shutil.copytree(SHIPPED_ZOO, staging, dirs_exist_ok=True)
    manifest = json.loads((SHIPPED_ZOO / "zoo.json").read_text())
    logger.info("world zoo: copied the shipped build (%s)", SHIPPED_ZOO)
    return {**manifest, "copied_from": str(SHIPPED_ZOO)}


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


ROLE_ORDER = ("bloom", "blip", "pickscore", "aesthetic", "sd")
"""The trained roles; a role's torch seed is world.seed * 1000 + its place here."""
BUILD_ORDER = ("bloom", "blip", "pickscore", "sd", "aesthetic")
"""The order they are built in: the aesthetic predictor learns from the world SD's renders too."""


def _role_trainers(tiny: TinyZooConfig, world: WorldConfig) -> dict[str, Callable[[Path], dict]]:
    """role -> build-and-train into a folder (returns the role's training stats)."""
    from bp_ray.embedded.world.lm_training import train_world_lm
    from bp_ray.embedded.world.samples import heldout_seed, make_samples, world_texts
    from bp_ray.embedded.world.sd_training import build_world_sd, render_prompts, styled_prompts
    from bp_ray.embedded.world.vision_training import train_world_aesthetic, train_world_captioner, train_world_clip

    texts = world_texts(world.seed)
    samples = make_samples(world.train_scenes, world.seed, tiny.image_size)
    lm_heldout = world_texts(heldout_seed(world.seed), num_scenes=200, corpus_rows=200)

    def sd_renders(sd_folder: Path) -> np.ndarray:
        """The world SD's renders of styled plain descriptions of the training scenes (render seeds of their own)."""
        scenes = samples.scenes[:world.aesthetic_sd_renders]
        return render_prompts(sd_folder, styled_prompts(scenes, world.seed), world.seed + 1, tiny.image_size)

    def tiny_then(builder: Callable[[Path, TinyZooConfig, list[str]], int],
                  train: Callable[[Path], dict]) -> Callable[[Path], dict]:
        def make(out: Path) -> dict:
            builder(out, tiny, texts)
            return train(out)
        return make

    return {
        "bloom": tiny_then(tiny_zoo.build_tiny_bloom, lambda out: train_world_lm(out, texts, world, lm_heldout)),
        "blip": tiny_then(tiny_zoo.build_tiny_blip, lambda out: train_world_captioner(out, samples, world)),
        "pickscore": tiny_then(tiny_zoo.build_tiny_clip, lambda out: train_world_clip(out, samples, world)),
        "aesthetic": tiny_then(tiny_zoo.build_tiny_aesthetic,
                               lambda out: train_world_aesthetic(out, samples, world, sd_renders(out.parent / "sd"))),
        # the world SD has its own VAE and UNet architecture, so it is built by its trainer
        "sd": lambda out: build_world_sd(out, samples, world, tiny, texts),
    }


def build_world_roles(out: Path, tiny: TinyZooConfig, world: WorldConfig,
                      roles: tuple[str, ...] = BUILD_ORDER) -> tuple[dict[str, dict], dict[str, float]]:
    """Build and train `roles` into out/<role>, each from its own seed, exactly as in a whole build (so one role can
    be rebuilt alone and compared: the aesthetic predictor alone needs out/sd); returns (training stats, seconds)
    per role, "samples" included."""
    start = time.perf_counter()
    trainers = _role_trainers(tiny, world)
    seconds = {"samples": time.perf_counter() - start}
    stats: dict[str, dict] = {}
    for role in roles:
        begin = time.perf_counter()
        torch.manual_seed(world.seed * 1000 + ROLE_ORDER.index(role))
        logger.info("world zoo: building and training %s", role)
        stats[role] = trainers[role](out / role)
        seconds[role] = time.perf_counter() - begin
        logger.info("world zoo: %s trained in %.1f s", role, seconds[role])
    return stats, seconds


def build_world_zoo(root: Path, tiny: TinyZooConfig, world: WorldConfig, force: bool = False,
                    roles: tuple[str, ...] = BUILD_ORDER) -> ZooSummary:
    """Build the tiny architectures and train each in the world; zoo.json records every model's time and stats.

    `roles` less than all retrains only those in the existing zoo at `root` and keeps the others' files and records
    (for a change to those roles' trainers or settings alone: nothing checks that the others are still current)."""
    unknown = set(roles) - set(BUILD_ORDER)
    if unknown:
        raise ValueError(f"unknown world role(s) {', '.join(sorted(unknown))}; choose from {', '.join(BUILD_ORDER)}")
    kept = [role for role in BUILD_ORDER if role not in roles]
    if kept and not (Path(root) / MANIFEST).is_file():
        raise FileNotFoundError(f"no world zoo at {root} to keep {', '.join(kept)} from: build every role first")
    earlier = json.loads((Path(root) / MANIFEST).read_text()) if kept else {}

    def build(staging: Path) -> dict:
        for role in kept:
            shutil.copytree(Path(root) / role, staging / role)
        stats, seconds = build_world_roles(staging, tiny, world, tuple(r for r in BUILD_ORDER if r in roles))
        stats = {**{role: earlier["training"][role] for role in kept}, **stats}
        seconds = {**{role: earlier["seconds"][role] for role in kept}, **seconds}
        # One contrastive CLIP serves both image-text roles, as one CLIP would on a real cluster.
        shutil.copytree(staging / "pickscore", staging / "clip")
        parameters = {role: _count(staging / role) for role in ZOO_ROLES}
        return {"key": world_key(tiny, world), "tiny": asdict(tiny), "world": asdict(world),
                "builder": BUILDER_VERSION, "parameters": parameters,
                "seconds": {k: round(v, 2) for k, v in seconds.items()}, "training": stats}

    return build_zoo(root, lambda: is_current(root, world_key(tiny, world)), build, force or bool(kept))
