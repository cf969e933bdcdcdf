"""Extension points: how a backend adds model families, prompt sources, evaluation metrics and config sections
without the product core importing it.

A backend is a Python package that declares an entry point in the group `bp_ray.extensions`, naming a function
`register(registry: Registry) -> None`. The core looks the registry up by name (`registry().model_resolvers["tiny"]`)
and loads every declared backend once per process on first use, so a Ray worker that only ever sees a config
string such as `world:sd` finds the same backends the driver did. bp-ray's own embedded backend (the tiny zoo and
the miniature world, `bp_ray.embedded`) registers itself this way; `pyproject.toml` declares it.

    [project.entry-points."bp_ray.extensions"]
    embedded = "bp_ray.embedded:register"
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "bp_ray.extensions"


@dataclass(frozen=True)
class ModelResolver:
    """`<prefix>:<role>` in a `models.*` key -> a local model folder in the format the role's loader reads."""

    prefix: str
    roles: tuple[str, ...]
    resolve: Callable[[str, Any], Path]
    """(role, the `models` config section) -> folder; builds or copies the models on first use."""


class PromptSource(Protocol):
    """What the generated corpus and the embedded evaluation set are made of (`data.corpus_kind`)."""

    def plain(self, rng: Any) -> str:
        """A short plain prompt, the kind a user types."""

    def rich(self, rng: Any) -> str:
        """A long, detailed prompt, the kind DiffusionDB's best images came from."""

    def image(self, prompt: str, seed: int, size: int) -> Any:
        """The corpus image of a prompt (an RGB PIL image), or None to use the generic drawing."""

    def eval_prompts(self, size: int, seed: int, exclude: set[str]) -> list[str]:
        """`size` distinct held-out plain prompts for `bp-ray eval`, none of them in `exclude` where possible."""

    def style_tags(self) -> Sequence[str] | None:
        """The tags the `tags` baseline may add, or None for the shipped vocabulary's."""


@dataclass(frozen=True)
class EvalMetric:
    """A per-image metric `bp-ray eval` computes from pixels beside the model scores (`eval.metrics`)."""

    name: str
    columns: tuple[str, ...]
    """Result columns, one value each per image (NaN where the metric does not apply)."""
    score: Callable[[Any, list[str]], Any]
    """((P, S, H, W, 3) uint8 images, the P user prompts) -> (P, S, len(columns)) float array."""
    labels: dict[str, str] = field(default_factory=dict)
    """Column -> how the report names it."""


@dataclass
class Registry:
    model_resolvers: dict[str, ModelResolver] = field(default_factory=dict)
    prompt_sources: dict[str, PromptSource] = field(default_factory=dict)
    eval_metrics: dict[str, EvalMetric] = field(default_factory=dict)
    config_sections: dict[str, type] = field(default_factory=dict)
    """Name -> dataclass of a backend's settings, kept under `models.zoo.<name>` of every config."""

    def add_model_resolver(self, resolver: ModelResolver) -> None:
        _add(self.model_resolvers, resolver.prefix, resolver, "model resolver")

    def add_prompt_source(self, name: str, source: PromptSource) -> None:
        _add(self.prompt_sources, name, source, "prompt source")

    def add_eval_metric(self, metric: EvalMetric) -> None:
        _add(self.eval_metrics, metric.name, metric, "eval metric")

    def add_config_section(self, name: str, section: type) -> None:
        _add(self.config_sections, name, section, "config section")


def _add(table: dict[str, Any], name: str, item: Any, kind: str) -> None:
    if name in table:
        raise ValueError(f"two backends register the {kind} {name!r}")
    table[name] = item


@functools.cache
def registry() -> Registry:
    """Every installed backend's registrations, loaded once per process."""
    found = Registry()
    for entry in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        entry.load()(found)
        logger.debug("bp-ray extension %s loaded from %s", entry.name, entry.value)
    return found


def zoo_sections() -> dict[str, Any]:
    """Default settings of every registered backend section: the default of `models.zoo`."""
    return {name: section() for name, section in registry().config_sections.items()}
