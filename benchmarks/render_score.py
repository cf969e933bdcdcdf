"""Rendering and labelling figures on the tiny zoo (2 CPU cores):

1. N seeds of a prompt in one batched pipeline call vs N separate calls: images/s and the ratio.
2. Labelling (render N seeds + PickScore + aesthetic + relevance) with the stage on Ray (`run_reward_labels`) vs
   one process with the same RewardLabeler, each from a cold cache; end to end, models loaded on both sides
   (ray.init excluded). The one process is timed twice: inside this script, whose libraries part 1 already
   imported, and as a fresh `python` that imports them itself, as the Ray stage's new worker does (the lazy
   imports of diffusers, transformers and open_clip take ~5 s here on first use).
3. A rerun of the stage against the warm cache vs its cold run (the stage consults the cache before starting
   any actor), and the same for the one-process labeler.

Labelling runs the preset's configuration (tiny: one fused actor that renders and scores on both cores, with
as many torch threads as this process, fed block by block; more actors or split pools run on Ray Data);
`--set rewards.fused=false --set data.renderer_pool.num_cpus=1` measures the split pools. Every figure is
measured --repeats times (fresh caches each time) and reported as the median with its range; the script refuses
to compare sides that compute with different thread counts.

    python benchmarks/render_score.py [--prompts 48] [--seeds 8] [--repeats 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pandas as pd
from machine import facts, print_results, refuse_mismatch, summary

from bp_ray.config_loader import load_config
from bp_ray.data import columns as C
from bp_ray.data.corpus import generate_prompts
from bp_ray.embedded.tiny_zoo import ensure_tiny_zoo
from bp_ray.rewards.labeler import RewardLabeler, RewardSetup
from bp_ray.rewards.pipeline import run_reward_labels
from bp_ray.rewards.render import render_seeds


def labelling(cfg) -> RewardSetup:
    """What labelling with this config renders and scores."""
    return RewardSetup.for_labels(cfg.data, cfg.rewards, cfg.models)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def batched_vs_separate(labeler: RewardLabeler, prompts: list[str]) -> tuple[float, float]:
    """Seconds for all seeds of `prompts` in one call, and in one call per (prompt, seed)."""
    render_seeds(labeler.pipe, prompts[:1], labeler.seeds[:1], labeler.render_cfg)  # warm-up
    _, batched_s = timed(lambda: render_seeds(labeler.pipe, prompts, labeler.seeds, labeler.render_cfg))
    _, separate_s = timed(lambda: [render_seeds(labeler.pipe, [p], [s], labeler.render_cfg)
                                   for p in prompts for s in labeler.seeds])
    return batched_s, separate_s


def one_process(cfg, cache: Path, prompts: list[str], intents: list[str], cached_only: bool) -> None:
    """The labelling loop in this process; a rerun only needs the cache: like the stage's driver, it loads no
    model then."""
    worker = RewardLabeler(labelling(cfg), str(cache), render=not cached_only, score=not cached_only)
    size = cfg.data.renderer_pool.batch_size
    for i in range(0, len(prompts), size):
        if cached_only:
            assert worker.cached(prompts[i:i + size], intents[i:i + size])[1].all()
        else:
            worker.label(prompts[i:i + size], intents[i:i + size])


def fresh_one_process(overrides: list[str], cache: Path, prompts: list[str], intents: list[str]) -> float:
    """Seconds for `one_process` in a new interpreter, from its start to its exit."""
    job = cache.with_suffix(".json")
    job.write_text(json.dumps({"cache": str(cache), "prompts": prompts, "intents": intents}))
    command = [sys.executable, __file__, "--one-process-job", str(job)]
    for override in overrides:
        command += ["--set", override]
    _, seconds = timed(lambda: subprocess.run(command, check=True))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48, help="pairs (each gives a low and a high prompt)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--one-process-job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = [f"data.num_seeds={args.seeds}", *args.overrides]
    cfg = load_config("tiny", overrides)
    if args.one_process_job:  # the fresh interpreter of fresh_one_process
        job = json.loads(Path(args.one_process_job).read_text())
        one_process(cfg, Path(job["cache"]), job["prompts"], job["intents"], cached_only=False)
        return
    import torch

    stage_pool = cfg.data.renderer_pool
    threads = {"one_process": torch.get_num_threads(), "ray_stage": max(1, math.ceil(stage_pool.num_cpus))}
    refuse_mismatch(**threads)
    ensure_tiny_zoo(cfg.models)
    texts = [t for t in generate_prompts(args.prompts * 6, seed=7) if t.strip() and len(t) < 300]
    lows, highs = texts[:args.prompts], texts[args.prompts:2 * args.prompts]
    all_prompts, intents = [*lows, *highs], [*lows, *lows]
    work = Path(tempfile.mkdtemp(prefix="bp-ray-render-bench-"))
    results: dict = {"machine": facts(**threads), "pairs": args.prompts, "seeds": args.seeds,
                     "image_size": cfg.data.render.height, "steps": cfg.data.render.num_inference_steps,
                     "fused": cfg.rewards.fused, "repeats": args.repeats}
    runs: dict[str, list[float]] = {name: [] for name in (
        "batched_images_per_s", "separate_images_per_s", "batched_speedup", "one_process_cold_s",
        "ray_stage_cold_s", "ray_stage_vs_one_process", "one_process_fresh_cold_s", "ray_stage_vs_fresh_one_process",
        "ray_stage_cached_rerun_s", "one_process_cached_rerun_s")}
    try:
        # 1. batched vs separate calls
        labeler = RewardLabeler(labelling(cfg), cache_path=None, score=False)
        images = 4 * len(labeler.seeds)
        for _ in range(args.repeats):
            batched_s, separate_s = batched_vs_separate(labeler, highs[:4])
            runs["batched_images_per_s"].append(images / batched_s)
            runs["separate_images_per_s"].append(images / separate_s)
            runs["batched_speedup"].append(separate_s / batched_s)
        del labeler

        # 2. one process vs the Ray Data stage, cold caches, alternating
        pairs_dir = work / "data"
        pairs_dir.mkdir()
        pd.DataFrame({C.PAIR_ID: [f"p{i}" for i in range(len(lows))], C.LOW: lows, C.HIGH: highs}).to_parquet(
            pairs_dir / "part-00000.parquet")
        import ray

        from bp_ray.ray_runtime import init_ray

        for repeat in range(args.repeats):
            # The one-process labeler runs with no Ray on the machine (a user without a cluster); Ray is started
            # afterwards, outside the stage's time, and stopped before the next repeat.
            cache = work / f"one-{repeat}.sqlite"
            _, one_cold_s = timed(partial(one_process, cfg, cache, all_prompts, intents, cached_only=False))
            _, one_warm_s = timed(partial(one_process, cfg, cache, all_prompts, intents, cached_only=True))
            fresh_s = fresh_one_process(overrides, work / f"fresh-{repeat}.sqlite", all_prompts, intents)
            init_ray(cfg.cluster)
            out = work / f"rewards-{repeat}"

            def label(out: Path = out) -> dict:
                return run_reward_labels(cfg.data, cfg.rewards, cfg.models, cfg.cluster, pairs_dir, out)

            cold, ray_cold_s = timed(label)
            warm, ray_warm_s = timed(label)
            assert warm["prompts_rendered"] == 0, warm
            runs["one_process_cold_s"].append(one_cold_s)
            runs["one_process_cached_rerun_s"].append(one_warm_s)
            runs["ray_stage_cold_s"].append(ray_cold_s)
            runs["ray_stage_cached_rerun_s"].append(ray_warm_s)
            runs["ray_stage_vs_one_process"].append(one_cold_s / ray_cold_s)
            runs["one_process_fresh_cold_s"].append(fresh_s)
            runs["ray_stage_vs_fresh_one_process"].append(fresh_s / ray_cold_s)
            ray.shutdown()
            print(f"repeat {repeat + 1}: one process {one_cold_s:.1f} s (a fresh one {fresh_s:.1f} s), Ray stage "
                  f"{ray_cold_s:.1f} s ({one_cold_s / ray_cold_s:.2f}x, {fresh_s / ray_cold_s:.2f}x); batched "
                  f"render {runs['batched_speedup'][repeat]:.2f}x", flush=True)
        results["unique_prompts"] = cold["unique_prompts"]
        results |= {name: summary(values) for name, values in runs.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_results(results)


if __name__ == "__main__":
    main()
