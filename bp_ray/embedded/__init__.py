"""bp-ray's embedded backend: the tiny zoo (random-weight models of the real architectures) and the miniature
world (those models trained on procedural scenes whose true quality is computed from pixels).

The product core never imports this package. It registers itself through the extension points of
`bp_ray.extensions` (the entry point in pyproject.toml): model resolvers for `tiny:<role>`, `world:<role>` and
`shapes:<role>` (the paper's architectures at real size, random weights), the `world` prompt source, the
`world_truth` evaluation metric, and the `models.zoo.tiny` / `.world` / `.shapes` config sections. Registration
imports nothing heavy; each piece loads its code on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bp_ray.embedded.config import ShapesConfig, TinyZooConfig, WorldConfig
from bp_ray.extensions import EvalMetric, ModelResolver, Registry

ZOO_ROLES = ("bloom", "blip", "sd", "pickscore", "clip", "aesthetic")
WORLD_TRUTH_COLUMNS = ("true_aesthetic", "colour_match", "shape_match", "count_match")


def _tiny_model(role: str, models_cfg: Any) -> Path:
    from bp_ray.embedded.tiny_zoo import ensure_tiny_zoo

    return ensure_tiny_zoo(models_cfg) / role


def _world_model(role: str, models_cfg: Any) -> Path:
    from bp_ray.embedded.world.zoo import ensure_world_zoo

    return ensure_world_zoo(models_cfg) / role


def _shapes_model(role: str, models_cfg: Any) -> Path:
    from bp_ray.embedded.shapes_zoo import ensure_shapes_role

    return ensure_shapes_role(role, models_cfg)


def _world_truth(pixels: Any, requests: list[str]) -> Any:
    from bp_ray.embedded.world.truth import world_truth_scores

    return world_truth_scores(pixels, requests)


def register(registry: Registry) -> None:
    """The entry point `bp_ray.extensions: embedded`."""
    from bp_ray.embedded.world.prompts import WorldPrompts

    registry.add_config_section("tiny", TinyZooConfig)
    registry.add_config_section("world", WorldConfig)
    registry.add_config_section("shapes", ShapesConfig)
    registry.add_model_resolver(ModelResolver("tiny", ZOO_ROLES, _tiny_model))
    registry.add_model_resolver(ModelResolver("world", ZOO_ROLES, _world_model))
    registry.add_model_resolver(ModelResolver("shapes", ZOO_ROLES, _shapes_model))
    registry.add_prompt_source("world", WorldPrompts())
    registry.add_eval_metric(EvalMetric(
        "world_truth", WORLD_TRUTH_COLUMNS, _world_truth,
        labels={"true_aesthetic": "True aesthetic (world)", "colour_match": "Colour match (world)",
                "shape_match": "Shape match (world)", "count_match": "Object count match (world)"}))
