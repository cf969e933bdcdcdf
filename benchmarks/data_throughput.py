"""Pair generation throughput: the Ray Data pipeline vs the same stage functions called in one process, and how
the stage grows with its input.

    python benchmarks/data_throughput.py [--rows 1200] [--repeats 3] [--marginal 2] [--ceiling] [--growth 10]
        [--set key=value ...]

Both sides process the same prepared rows of the embedded corpus with the tiny zoo through the same UDFs and
writer, one side after the other, --repeats times. Two figures per side: end to end (loading models included; the
Ray side excludes `ray.init`, a cluster is already up in real use, but includes its actors importing torch), and
steady state: rows committed after the first batch commit divided by the time to the last commit, which is what
a long data-generation job sees. That figure overstates a pipeline whose first commit comes late and whose backlog
then drains at once, so --marginal F also runs both sides on F x --rows and prints each side's marginal rate: the
extra rows over the extra seconds, which neither start-up nor a late burst of commits can inflate. The Ray side
runs the preset's pools on a local Ray of `cluster.num_cpus` CPUs (tiny: 2, this machine's cores); the sequential
side computes with as many torch threads. Each figure is the median of the repeats with its range.

--ceiling also measures what two cores can give at best: the sequential path in two processes at once, one
torch thread each, each on half of the rows (perfect parallelism, no Ray, no hand-over between stages); its
throughput over the 2-thread sequential path bounds what any pipeline on this machine can reach.

--growth F then runs the whole stage (`run_data_generation`: read, filter, model stages, consolidation) on
--rows and on F x --rows corpus rows, and prints the wall-time ratio and the peak resident memory of the driver
and of every Ray actor kind (sampled every 0.2 s) at both sizes: a streaming stage keeps them flat.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.parquet as pq
from machine import facts, print_results, refuse_mismatch, summary

from bp_ray.config_loader import load_config
from bp_ray.data import columns as C
from bp_ray.data import work_store
from bp_ray.data.captions import Captioner
from bp_ray.data.pipeline import prepare_rows, read_source, run_data_generation, run_model_stages, write_batch
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


class PeakMemory:
    """Samples the resident memory of this process and of every Ray worker below it; keeps each one's peak, by
    kind (the driver, or the actor class a worker's title names)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        found = [("driver", me)]
        for child in me.children(recursive=True):
            try:
                title = " ".join(child.cmdline())
            except psutil.Error:
                continue
            for kind in ("Captioner", "PromptRewriter", "ImageAesthetic", "write_batch"):
                if kind in title:
                    found.append((kind, child))
        for kind, process in found:
            try:
                rss = process.memory_info().rss / 2**20
            except psutil.Error:
                continue
            self.peaks[kind] = max(self.peaks.get(kind, 0.0), rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def timed(job, *args) -> float:
    start = time.perf_counter()
    job(*args)
    return time.perf_counter() - start


def throughput(cfg, rows: pd.DataFrame, workdir: Path, repeats: int, more_rows: pd.DataFrame | None = None) -> dict:
    """End to end and steady figures of both sides on `rows`; with `more_rows` (a larger input) also the
    marginal rate of each side: the extra rows over the extra time, which start-up and a backlog that drains at
    the end cannot inflate."""
    names = ["sequential_s", "ray_data_s", "speedup_end_to_end", "sequential_steady_rows_per_s",
             "ray_data_steady_rows_per_s", "speedup_steady_state"]
    if more_rows is not None:
        names += ["sequential_marginal_rows_per_s", "ray_data_marginal_rows_per_s", "speedup_marginal"]
    runs: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        sequential_s = timed(run_sequential, rows, cfg, workdir / f"sequential-{repeat}")
        sequential_steady = steady_state_rows_per_s(workdir / f"sequential-{repeat}")
        ray_s = timed(run_model_stages, rows, cfg.data, cfg.models, workdir / f"ray-{repeat}")
        ray_steady = steady_state_rows_per_s(workdir / f"ray-{repeat}")
        for name, value in (("sequential_s", sequential_s), ("ray_data_s", ray_s),
                            ("speedup_end_to_end", sequential_s / ray_s),
                            ("sequential_steady_rows_per_s", sequential_steady),
                            ("ray_data_steady_rows_per_s", ray_steady),
                            ("speedup_steady_state", ray_steady / sequential_steady)):
            runs[name].append(value)
        line = (f"repeat {repeat + 1}: end to end {sequential_s:.1f} s sequential, {ray_s:.1f} s Ray Data "
                f"({sequential_s / ray_s:.2f}x); steady {sequential_steady:.1f} vs {ray_steady:.1f} rows/s "
                f"({ray_steady / sequential_steady:.2f}x)")
        if more_rows is not None:
            extra = len(more_rows) - len(rows)
            sequential_more_s = timed(run_sequential, more_rows, cfg, workdir / f"sequential-more-{repeat}")
            ray_more_s = timed(run_model_stages, more_rows, cfg.data, cfg.models, workdir / f"ray-more-{repeat}")
            sequential_marginal = extra / (sequential_more_s - sequential_s)
            ray_marginal = extra / (ray_more_s - ray_s)
            runs["sequential_marginal_rows_per_s"].append(sequential_marginal)
            runs["ray_data_marginal_rows_per_s"].append(ray_marginal)
            runs["speedup_marginal"].append(ray_marginal / sequential_marginal)
            line += (f"; marginal ({len(rows)} -> {len(more_rows)} rows) {sequential_marginal:.1f} vs "
                     f"{ray_marginal:.1f} rows/s ({ray_marginal / sequential_marginal:.2f}x)")
        print(line, flush=True)
    return {name: summary(values) for name, values in runs.items()}


def two_halves(rows: pd.DataFrame, overrides: list[str], workdir: Path) -> tuple[float, float]:
    """The sequential path in two processes at once, one torch thread each, on half of the rows each: wall seconds
    from their start to the last one's exit, and their steady rows/s added up."""
    workdir.mkdir(parents=True, exist_ok=True)
    halves = [rows.iloc[: len(rows) // 2], rows.iloc[len(rows) // 2:]]
    commands = []
    for i, half in enumerate(halves):
        half.to_pickle(workdir / f"half-{i}.pkl")
        command = [sys.executable, __file__, "--half-job", str(workdir / f"half-{i}.pkl"), str(workdir / f"half-{i}")]
        for override in overrides:
            command += ["--set", override]
        commands.append(command)
    start = time.perf_counter()
    processes = [subprocess.Popen(command) for command in commands]
    if any(process.wait() for process in processes):
        raise RuntimeError("a half-job failed")
    wall = time.perf_counter() - start
    return wall, sum(steady_state_rows_per_s(workdir / f"half-{i}") for i in range(2))


def ceiling(cfg, rows: pd.DataFrame, overrides: list[str], workdir: Path, repeats: int) -> dict:
    runs: dict[str, list[float]] = {name: [] for name in ("two_halves_end_to_end", "two_halves_steady")}
    for repeat in range(repeats):
        start = time.perf_counter()
        run_sequential(rows, cfg, workdir / f"ceiling-sequential-{repeat}")
        sequential_s = time.perf_counter() - start
        sequential_steady = steady_state_rows_per_s(workdir / f"ceiling-sequential-{repeat}")
        halves_s, halves_steady = two_halves(rows, overrides, workdir / f"ceiling-{repeat}")
        runs["two_halves_end_to_end"].append(sequential_s / halves_s)
        runs["two_halves_steady"].append(halves_steady / sequential_steady)
        print(f"ceiling {repeat + 1}: two 1-thread processes on half the rows each: end to end "
              f"{sequential_s / halves_s:.2f}x, steady {halves_steady / sequential_steady:.2f}x the 2-thread "
              "sequential path", flush=True)
    return {f"ceiling_{name}": summary(values) for name, values in runs.items()}


def growth(base_overrides: list[str], rows: int, factor: int, workdir: Path) -> dict:
    """The whole stage at `rows` and `factor` x `rows` corpus rows: wall time and peak memory by process kind."""
    sizes = {}
    for n in (rows, rows * factor):
        cfg = load_config("tiny", [*base_overrides, f"data.corpus_rows={n}"])
        with PeakMemory() as memory:
            start = time.perf_counter()
            manifest = run_data_generation(cfg.data, cfg.models, cfg.cluster, workdir / f"stage-{n}",
                                           corpus_dir=workdir / f"corpus-{n}")
            wall = time.perf_counter() - start
        sizes[n] = {"wall_s": round(wall, 1), "rows_through_models": manifest["rows_to_process"],
                    "pairs_out": manifest["pairs_out"],
                    "peak_rss_mib": {kind: round(peak) for kind, peak in sorted(memory.peaks.items())}}
        print(f"growth: {n} corpus rows in {wall:.1f} s, peak RSS MiB {sizes[n]['peak_rss_mib']}", flush=True)
    small, large = sizes[rows], sizes[rows * factor]
    return {"sizes": sizes, "wall_ratio": round(large["wall_s"] / small["wall_s"], 2),
            "peak_rss_ratio": {kind: round(large["peak_rss_mib"][kind] / small["peak_rss_mib"][kind], 2)
                               for kind in small["peak_rss_mib"] if kind in large["peak_rss_mib"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1200, help="corpus rows (about 3/4 reach the model stages)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--growth", type=int, default=0, metavar="F",
                        help="also run the whole stage on F x --rows corpus rows (0: skip)")
    parser.add_argument("--ceiling", action="store_true", help="also measure two 1-thread processes on half each")
    parser.add_argument("--marginal", type=int, default=0, metavar="F",
                        help="also run both sides on F x --rows corpus rows: the marginal rows/s (0: skip)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--half-job", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = load_config("tiny", [f"data.corpus_rows={args.rows}", *args.overrides])
    import torch

    if args.half_job:  # a process of two_halves
        torch.set_num_threads(1)
        run_sequential(pd.read_pickle(args.half_job[0]), cfg, Path(args.half_job[1]))
        return

    threads = {"sequential": torch.get_num_threads(), "ray_cluster_cpus": int(cfg.cluster.num_cpus or 0)}
    refuse_mismatch(**threads)
    ensure_tiny_zoo(cfg.models)
    workdir = Path(tempfile.mkdtemp(prefix="bp-ray-data-bench-"))
    results: dict = {"machine": facts(**threads)}
    try:
        table, _, _ = read_source(cfg.data, workdir / "corpus")
        rows, _ = prepare_rows(table, cfg.data)
        results["rows_through_models"] = len(rows)
        results["high_rows_with_image"] = int(((rows[C.QUALITY] == "high") & (rows[C.IMAGE_REF] != "")).sum())
        import ray

        from bp_ray.ray_runtime import init_ray

        start = time.perf_counter()
        init_ray(cfg.cluster)
        results["ray_init_s_excluded"] = round(time.perf_counter() - start, 1)
        more_rows = None
        if args.marginal:
            more_cfg = load_config("tiny", [f"data.corpus_rows={args.rows * args.marginal}", *args.overrides])
            more_table, _, _ = read_source(more_cfg.data, workdir / "corpus-more")
            more_rows, _ = prepare_rows(more_table, more_cfg.data)
            results["marginal_rows_through_models"] = len(more_rows)
        if args.repeats:
            results |= throughput(cfg, rows, workdir, args.repeats, more_rows)
        if args.ceiling:
            (workdir / "ceiling").mkdir()
            results |= ceiling(cfg, rows, [f"data.corpus_rows={args.rows}", *args.overrides], workdir / "ceiling",
                               args.repeats or 1)
        if args.growth:
            results["growth"] = growth(args.overrides, args.rows, args.growth, workdir)
        ray.shutdown()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_results(results)


if __name__ == "__main__":
    main()
