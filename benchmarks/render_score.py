"""Rendering and labelling figures on the tiny zoo (2 CPU cores):

1. N seeds of a prompt in one batched pipeline call vs N separate calls: images/s and the ratio.
2. Labelling (render N seeds + PickScore + aesthetic + relevance) with the Ray Data stage vs one process with
   the same RewardLabeler, each from a cold cache; end to end, models loaded on both sides (ray.init excluded).
3. A rerun of the Ray Data stage against the warm cache vs its cold run (the stage consults the cache before
   starting any actor), and the same for the one-process labeler.

    python benchmarks/render_score.py [--prompts 48] [--seeds 8] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48, help="pairs (each gives a low and a high prompt)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config("tiny", [f"data.num_seeds={args.seeds}", "data.renderer_pool.max_actors=2",
                               "data.renderer_pool.num_cpus=0.5", "data.scorer_pool.num_cpus=0.5",
                               *args.overrides])
    ensure_tiny_zoo(cfg.models)
    texts = [t for t in generate_prompts(args.prompts * 6, seed=7) if t.strip() and len(t) < 300]
    lows, highs = texts[:args.prompts], texts[args.prompts:2 * args.prompts]
    work = Path(tempfile.mkdtemp(prefix="bp-ray-render-bench-"))
    results: dict[str, float | int] = {"pairs": args.prompts, "seeds": args.seeds,
                                       "image_size": cfg.data.render.height,
                                       "steps": cfg.data.render.num_inference_steps}
    try:
        # 1. batched vs separate calls
        labeler = RewardLabeler(labelling(cfg), cache_path=None)
        prompts = highs[:4]
        render_seeds(labeler.pipe, prompts[:1], labeler.seeds[:1], labeler.render_cfg)  # warm-up
        _, batched_s = timed(lambda: render_seeds(labeler.pipe, prompts, labeler.seeds, labeler.render_cfg))
        _, separate_s = timed(lambda: [render_seeds(labeler.pipe, [p], [s], labeler.render_cfg)
                                       for p in prompts for s in labeler.seeds])
        images = len(prompts) * len(labeler.seeds)
        results |= {"batched_images_per_s": round(images / batched_s, 1),
                    "separate_images_per_s": round(images / separate_s, 1),
                    "batched_speedup": round(separate_s / batched_s, 2)}

        # 2. one process vs the Ray Data stage, cold caches
        all_prompts, intents = [*lows, *highs], [*lows, *lows]
        def one_process(cache: Path, cached_only: bool) -> None:
            # A rerun only needs the cache: like the stage's driver, it loads no model then.
            worker = RewardLabeler(labelling(cfg), str(cache), render=not cached_only, score=not cached_only)
            size = cfg.data.renderer_pool.batch_size
            for i in range(0, len(all_prompts), size):
                if cached_only:
                    assert worker.cached(all_prompts[i:i + size], intents[i:i + size])[1].all()
                else:
                    worker.label(all_prompts[i:i + size], intents[i:i + size])

        _, one_cold_s = timed(lambda: one_process(work / "one.sqlite", cached_only=False))
        _, one_warm_s = timed(lambda: one_process(work / "one.sqlite", cached_only=True))
        pairs_dir = work / "data"
        pairs_dir.mkdir()
        pd.DataFrame({C.PAIR_ID: [f"p{i}" for i in range(len(lows))], C.LOW: lows, C.HIGH: highs}).to_parquet(
            pairs_dir / "part-00000.parquet")
        import ray

        from bp_ray.ray_runtime import init_ray

        init_ray(cfg.cluster)
        def label() -> dict:
            return run_reward_labels(cfg.data, cfg.rewards, cfg.models, cfg.cluster, pairs_dir, work / "rewards")

        cold, ray_cold_s = timed(label)
        warm, ray_warm_s = timed(label)
        ray.shutdown()
        prompts_n = cold["unique_prompts"]
        results |= {
            "unique_prompts": prompts_n,
            "one_process_cold_s": round(one_cold_s, 1), "one_process_prompts_per_s": round(prompts_n / one_cold_s, 2),
            "ray_data_cold_s": round(ray_cold_s, 1), "ray_data_prompts_per_s": round(prompts_n / ray_cold_s, 2),
            "ray_data_vs_one_process": round(one_cold_s / ray_cold_s, 2),
            "ray_data_cached_rerun_s": round(ray_warm_s, 2),
            "ray_data_cached_speedup": round(ray_cold_s / ray_warm_s, 1),
            "one_process_cached_rerun_s": round(one_warm_s, 2),
            "one_process_cached_speedup": round(one_cold_s / one_warm_s, 1),
            "rerun_rendered": warm["prompts_rendered"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
