"""Pair generation throughput: the Ray Data pipeline vs the same stage functions called in one process.

    python benchmarks/data_throughput.py [--rows 600] [--set key=value ...]

Both sides process the same prepared rows of the embedded corpus with the tiny zoo and include loading their
models; the Ray side excludes `ray.init` (a cluster is already up in real use) and runs each model pool with up
to 2 actors. Prints rows/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from bp_ray.config import load_config
from bp_ray.data import columns as C
from bp_ray.data.captions import Captioner
from bp_ray.data.pipeline import prepare_rows, read_source, run_model_stages, write_batch
from bp_ray.data.rewrite import PromptRewriter
from bp_ray.models.tiny_zoo import ensure_tiny_zoo


def run_sequential(rows, cfg, work_dir: Path) -> None:
    """The same UDFs and writer, one batch after another in this process."""
    captioner = Captioner(cfg.models, cfg.data.caption_max_new_tokens)
    rewriter = PromptRewriter(cfg.data, cfg.models)
    size = cfg.data.rewriter_pool.batch_size
    for start in range(0, len(rows), size):
        chunk = rows.iloc[start:start + size]
        batch = {name: chunk[name].to_numpy() for name in chunk.columns}
        batch = rewriter(captioner(batch))
        write_batch(pd.DataFrame(batch), str(work_dir), cfg.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600, help="corpus rows (about half reach the model stages)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config("tiny", [f"data.corpus_rows={args.rows}", "data.rewriter_pool.min_actors=2",
                               "data.captioner_pool.min_actors=2", *args.overrides])
    ensure_tiny_zoo(cfg.models)
    workdir = Path(tempfile.mkdtemp(prefix="bp-ray-data-bench-"))
    try:
        table, _, _ = read_source(cfg, workdir / "corpus")
        rows, _ = prepare_rows(table, cfg.data)

        start = time.perf_counter()
        run_sequential(rows, cfg, workdir / "sequential")
        sequential_s = time.perf_counter() - start

        import ray

        from bp_ray.ray_runtime import init_ray

        start = time.perf_counter()
        init_ray(cfg.cluster)
        init_s = time.perf_counter() - start
        start = time.perf_counter()
        run_model_stages(rows, cfg, workdir / "ray")
        ray_s = time.perf_counter() - start
        ray.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    n = len(rows)
    print(json.dumps({
        "rows_through_models": n, "high_rows_with_image": int(((rows[C.QUALITY] == "high")
                                                               & (rows[C.IMAGE_REF] != "")).sum()),
        "sequential_s": round(sequential_s, 1), "sequential_rows_per_s": round(n / sequential_s, 1),
        "ray_data_s": round(ray_s, 1), "ray_data_rows_per_s": round(n / ray_s, 1),
        "ray_init_s_excluded": round(init_s, 1), "speedup": round(sequential_s / ray_s, 2),
        "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
