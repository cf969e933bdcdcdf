"""Foundation figures: install time and size (fresh venv), tiny-zoo build time and size, corpus generation.

    python benchmarks/foundation.py              # zoo + corpus (about 30 s)
    python benchmarks/foundation.py --install    # also a fresh `make install` into a temporary venv (minutes)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def measure_install(workdir: Path) -> dict:
    """`make install` into a fresh venv: wall time and size on disk."""
    venv = workdir / "venv"
    start = time.perf_counter()
    subprocess.run(["make", "-C", str(REPO), "install", f"VENV={venv}"], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    check = subprocess.run([str(venv / "bin" / "pip"), "check"], capture_output=True, text=True)
    torch_version = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    return {"install_seconds": round(seconds, 1), "venv_gb": round(folder_bytes(venv) / 1e9, 2),
            "pip_check": check.stdout.strip() or check.stderr.strip(), "torch": torch_version}


def measure_zoo(workdir: Path) -> dict:
    from bp_ray.config_loader import load_config
    from bp_ray.embedded.tiny_zoo import build_tiny_zoo

    tiny = load_config("tiny").models.zoo["tiny"]
    cold = build_tiny_zoo(workdir / "zoo" / "tiny", tiny)
    start = time.perf_counter()
    warm = build_tiny_zoo(workdir / "zoo" / "tiny", tiny)
    cached_seconds = time.perf_counter() - start
    assert cold.built and not warm.built
    return {"zoo_build_seconds": round(cold.seconds, 1), "zoo_cached_check_seconds": round(cached_seconds, 3),
            "zoo_mb": round(cold.bytes / 1e6, 1), "zoo_parameters": cold.parameters}


def measure_corpus(workdir: Path, rows: int) -> dict:
    from bp_ray.data.corpus import CorpusSpec, write_corpus

    start = time.perf_counter()
    summary = write_corpus(workdir / "corpus", CorpusSpec(num_rows=rows))
    seconds = time.perf_counter() - start
    return {"corpus_rows": rows, "corpus_seconds": round(seconds, 2), "corpus_rows_per_s": round(rows / seconds),
            "corpus_mb": round(summary.bytes_on_disk / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true", help="also time a fresh install (several minutes)")
    parser.add_argument("--corpus-rows", type=int, default=10_000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bp-ray-bench-"))
    try:
        results = {}
        if args.install:
            results.update(measure_install(workdir))
        results.update(measure_zoo(workdir))
        results.update(measure_corpus(workdir, args.corpus_rows))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
