"""Pair generation throughput: the Ray Data pipeline vs the same stage functions called in one process.

    python benchmarks/data_throughput.py [--rows 600] [--set key=value ...]

Both sides process the same prepared rows of the embedded corpus with the tiny zoo through the same UDFs and
writer. Two figures per side: end to end (loading models included; the Ray side excludes `ray.init`, a cluster
is already up in real use, but includes its actors importing torch), and steady state: rows committed after the
first batch commit divided by the time to the last commit, which is what a long data-generation job sees.
The Ray side runs 1 captioner and 2 rewriter actors (the rewriter is the bottleneck). Prints the ratios.
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
import pyarrow.parquet as pq

from bp_ray.config_loader import load_config
from bp_ray.data import columns as C
from bp_ray.data import work_store
from bp_ray.data.captions import Captioner
from bp_ray.data.pipeline import prepare_rows, read_source, run_model_stages, write_batch
from bp_ray.data.rewrite import PromptRewriter
from bp_ray.embedded.tiny_zoo import ensure_tiny_zoo


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


def steady_state_rows_per_s(work_dir: Path) -> float:
    """Rows in batches committed after the first one, over the time from the first commit to the last."""
    commits = sorted((path.stat().st_mtime, len(pq.read_table(path, columns=[C.ROW_ID]).column(0).unique()))
                     for path in work_store.committed_files(work_dir))
    span = commits[-1][0] - commits[0][0]
    return sum(rows for _, rows in commits[1:]) / span if span > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600, help="corpus rows (about half reach the model stages)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config("tiny", [f"data.corpus_rows={args.rows}", "data.rewriter_pool.min_actors=2",
                               "data.rewriter_pool.max_actors=2", "data.captioner_pool.max_actors=1",
                               *args.overrides])
    ensure_tiny_zoo(cfg.models)
    workdir = Path(tempfile.mkdtemp(prefix="bp-ray-data-bench-"))
    try:
        table, _, _ = read_source(cfg.data, workdir / "corpus")
        rows, _ = prepare_rows(table, cfg.data)

        start = time.perf_counter()
        run_sequential(rows, cfg, workdir / "sequential")
        sequential_s = time.perf_counter() - start
        sequential_steady = steady_state_rows_per_s(workdir / "sequential")

        import ray

        from bp_ray.ray_runtime import init_ray

        start = time.perf_counter()
        init_ray(cfg.cluster)
        init_s = time.perf_counter() - start
        start = time.perf_counter()
        run_model_stages(rows, cfg, workdir / "ray")
        ray_s = time.perf_counter() - start
        ray_steady = steady_state_rows_per_s(workdir / "ray")
        ray.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    n = len(rows)
    print(json.dumps({
        "rows_through_models": n, "high_rows_with_image": int(((rows[C.QUALITY] == "high")
                                                               & (rows[C.IMAGE_REF] != "")).sum()),
        "sequential_s": round(sequential_s, 1), "sequential_rows_per_s": round(n / sequential_s, 1),
        "ray_data_s": round(ray_s, 1), "ray_data_rows_per_s": round(n / ray_s, 1),
        "ray_init_s_excluded": round(init_s, 1), "speedup_end_to_end": round(sequential_s / ray_s, 2),
        "sequential_steady_rows_per_s": round(sequential_steady, 1), "ray_data_steady_rows_per_s": round(ray_steady, 1),
        "speedup_steady_state": round(ray_steady / sequential_steady, 2),
        "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
