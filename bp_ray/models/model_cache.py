"""The local cache of built and imported models: one folder per zoo (or imported file) under `models.zoo_dir`,
written atomically under a lock, with a `zoo.json` manifest recording what built it."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bp_ray.config import ModelsConfig
from bp_ray.models.loading import quiet_hf_progress

logger = logging.getLogger(__name__)

MANIFEST = "zoo.json"
Known = TypeVar("Known")


def known_model(table: Mapping[str, Known], kind: str, prefix: str, name: str) -> Known:
    """The entry of `<prefix><name>` in a table of models that packages ship; a clear error naming the known ones."""
    if name not in table:
        raise ValueError(f"unknown {kind} {prefix}{name}; known: {', '.join(prefix + n for n in table)}")
    return table[name]


def installed_package_dir(module: str) -> Path | None:
    """The folder of an installed Python package, found without importing it; None when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass
class ZooSummary:
    path: str
    built: bool
    """False when an up-to-date cached zoo was reused."""
    seconds: float
    bytes: int
    parameters: dict[str, int]


def default_zoo_dir(models_cfg: ModelsConfig) -> Path:
    if models_cfg.zoo_dir:
        return Path(models_cfg.zoo_dir).expanduser()
    cache = os.environ.get("BP_RAY_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "bp-ray") / "zoo"


@contextmanager
def _exclusive(lock_path: Path):
    # Several Ray actors may hit first use at once: one builds, the others wait and reuse.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_zoo(root: Path, is_current: Callable[[], bool], build: Callable[[Path], dict],
              force: bool = False) -> ZooSummary:
    """Run `build(staging)` under a lock and move its folder to `root` only when complete, with build()'s manifest
    (plus size and time) as zoo.json; reuse `root` when is_current() says it is up to date."""
    root = Path(root)
    with _exclusive(root.parent / f".{root.name}.lock"):
        if not force and is_current():
            recorded = json.loads((root / MANIFEST).read_text())
            return ZooSummary(str(root), False, 0.0, recorded["bytes"], recorded["parameters"])
        quiet_hf_progress()
        start = time.perf_counter()
        staging = root.parent / f".{root.name}.building"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        manifest = build(staging)
        seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
        manifest.update(bytes=size, build_seconds=round(seconds, 2))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
        logger.info("built %s zoo in %.1f s (%.1f MB) at %s", root.name, seconds, size / 1e6, root)
        return ZooSummary(str(root), True, seconds, size, manifest["parameters"])
