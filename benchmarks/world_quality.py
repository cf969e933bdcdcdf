"""How good the world zoo's models are, judged by the miniature world's ground truth on held-out scenes, and
(with --pipeline) whether the whole world pipeline's PPO prompts raise the ground-truth aesthetic of their renders.

    python benchmarks/world_quality.py                      # build (or reuse) the world zoo, measure each model
    python benchmarks/world_quality.py --force              # rebuild it first (times every model's training)
    python benchmarks/world_quality.py --pipeline runs/world  # also run `bp-ray pipeline --preset world` there
    python benchmarks/world_quality.py --check-shipped      # rebuild every role, compare with the shipped zoo

Prints: build time per model; LM held-out loss and share of free samples that describe a world scene; caption
attribute accuracy; CLIP image->text top-1 retrieval vs chance; aesthetic Spearman vs the true aesthetic; SD
colour match vs chance and the true-aesthetic change per style phrase; with --pipeline, the eval table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def _print_block(title: str, values: dict, indent: str = "  ") -> None:
    print(title)
    for key, value in values.items():
        if isinstance(value, dict):
            _print_block(f"{indent}{key}:", value, indent + "  ")
        elif isinstance(value, float):
            print(f"{indent}{key:<34}{value:10.4f}")
        else:
            print(f"{indent}{key:<34}{value!s:>10}")


def measure_zoo(root: Path, cfg, num_seeds: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bp_ray.embedded.world.lm_training import sample_world_share
    from bp_ray.embedded.world.samples import heldout_seed, make_samples
    from bp_ray.embedded.world.sd_training import measure_sd
    from bp_ray.embedded.world.vision_training import measure_aesthetic, measure_captioner, measure_clip
    from bp_ray.models.loading import load_diffusion

    manifest = json.loads((root / "zoo.json").read_text())
    print(f"world zoo {root} ({manifest['bytes'] / 1e6:.1f} MB), built in {manifest['build_seconds']:.1f} s:")
    for role, seconds in manifest["seconds"].items():
        params = manifest["parameters"].get(role)
        print(f"  {role:<12}{seconds:8.1f} s" + (f"  {params:>10,} parameters" if params else ""))
    world = cfg.models.zoo["world"]
    heldout = make_samples(world.heldout_scenes, heldout_seed(world.seed), cfg.models.zoo["tiny"].image_size)
    print(f"held-out scenes: {len(heldout)} (seed {heldout_seed(world.seed)}, never trained on)")

    lm = manifest["training"]["bloom"]
    model = AutoModelForCausalLM.from_pretrained(root / "bloom")
    tokenizer = AutoTokenizer.from_pretrained(root / "bloom")
    _print_block("LM (tiny BLOOM) on prompt text:", {
        "held-out loss before training": lm["heldout_loss_before"], "held-out loss after": lm["heldout_loss_after"],
        "samples describing a world scene": sample_world_share(model, tokenizer, num=64, seed=world.seed)})
    _print_block("captioner (tiny BLIP), held-out images:", measure_captioner(root / "blip", heldout))
    _print_block("CLIP (PickScore and relevance roles), held-out pairs:", measure_clip(root / "pickscore", heldout))
    _print_block("aesthetic predictor vs the true aesthetic:", measure_aesthetic(root / "aesthetic", heldout))
    pipe = load_diffusion(str(root / "sd"), cfg.models, device="cpu", scheduler=cfg.data.render.scheduler)
    render = cfg.data.render
    print(f"SD renders: {render.height}x{render.width}, {render.num_inference_steps} {render.scheduler} steps, "
          f"guidance {render.guidance_scale}, {num_seeds} seeds per prompt")
    _print_block("SD (tiny UNet + VAE + CLIP text encoder):", measure_sd(pipe, heldout, render, num_seeds))


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def run_pipeline(out: Path, sets: list[str]) -> None:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "bp_ray.cli", "pipeline", "--preset", "world", "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True)
    print(f"world pipeline: {time.perf_counter() - start:.1f} s wall")
    results = json.loads((out / "eval" / "results.json").read_text())
    metrics = ["true_aesthetic", "colour_match", "relevance", "aesthetic", "pickscore", "reward", "words"]
    print(f"eval: {results['prompts']['count']} held-out plain prompts x {len(results['seeds'])} seeds; "
          "true_aesthetic and colour_match are the world's ground truth, judged against the user prompt")
    print(f"{'system':<10}" + "".join(f"{m:>22}" for m in metrics))
    for row in results["table"]:
        cells = "".join(f"{row[f'{m}_mean']:>10.3f} ±{_or_nan(row[f'{m}_ci']):<10.3f}" for m in metrics)
        print(f"{row['system']:<10}{cells}")
    for comp in results["comparisons"]:
        if comp["metric"] in ("true_aesthetic", "colour_match", "relevance") and comp["p_t"] is not None:
            print(f"  {comp['system']} vs {comp['baseline']:<9} {comp['metric']:<15} mean diff "
                  f"{comp['mean_diff']:+.3f}  win rate {comp['win_rate']:.2f}  p(t) {comp['p_t']:.3g}")


def check_shipped(cfg) -> bool:
    """Rebuild every role of the default world zoo into a temporary folder and compare it with the zoo shipped in
    bp_ray/embedded/resources/zoo/world: bytes (equal only on the CPU that built it) and every final training loss
    (within 5% on any CPU). Prints each role's time and verdict."""
    import tempfile

    from bp_ray.embedded.world.zoo import ROLE_ORDER, SHIPPED_ZOO, build_world_roles, file_digests

    shipped = json.loads((SHIPPED_ZOO / "zoo.json").read_text())["training"]
    with tempfile.TemporaryDirectory() as tmp:
        stats, seconds = build_world_roles(Path(tmp), cfg.models.zoo["tiny"], cfg.models.zoo["world"])
        same = {role: file_digests(Path(tmp) / role) == file_digests(SHIPPED_ZOO / role) for role in ROLE_ORDER}
    close = {}
    for role in ROLE_ORDER:
        losses = [key for key in shipped[role] if "loss" in key and ("last" in key or "after" in key)]
        close[role] = all(abs(stats[role][key] - shipped[role][key]) <= 0.05 * abs(shipped[role][key])
                          for key in losses)
        detail = "  ".join(f"{key} {shipped[role][key]:.4f} -> {stats[role][key]:.4f}" for key in losses)
        print(f"  {role:<10}{seconds[role]:8.1f} s  bytes {'identical' if same[role] else 'differ'}  "
              f"losses {'match' if close[role] else 'DIFFER'}: {detail}")
    print(f"rebuilt in {sum(seconds.values()):.1f} s: bytes {'identical' if all(same.values()) else 'differ'}, "
          f"training losses {'match' if all(close.values()) else 'DO NOT match'}")
    return all(close.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild the world zoo even if cached")
    parser.add_argument("--seeds", type=int, default=2, help="SD render seeds per held-out prompt")
    parser.add_argument("--pipeline", metavar="DIR", default=None, help="also run the world pipeline into DIR")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--check-shipped", action="store_true", help="rebuild every role, compare with the shipped")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from bp_ray.config_loader import load_config
    from bp_ray.embedded.world.zoo import build_world_zoo, world_zoo_dir

    cfg = load_config("world", args.set)
    if args.check_shipped:
        return 0 if check_shipped(cfg) else 1
    root = world_zoo_dir(cfg.models)
    build_world_zoo(root, cfg.models.zoo["tiny"], cfg.models.zoo["world"], force=args.force)
    measure_zoo(root, cfg, args.seeds)
    if args.pipeline:
        run_pipeline(Path(args.pipeline), args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
