"""How far can a rewrite that keeps the user's words raise the world's true aesthetic, and does the world's
aesthetic predictor see it? The ceiling issue 20's targets are measured against, with no policy involved.

    python benchmarks/world_headroom.py [--prompts 96] [--seeds 2] [--other-aesthetic DIR] [--truth] [--set KEY=VALUE]

Renders every evaluation prompt of the world preset followed by each set of style phrases (at most one per group,
in the describer's order) with the world SD at the evaluation's render settings and seeds, and prints:
- per phrase set: the true aesthetic gain over the bare prompt, the predicted (world aesthetic predictor) gain,
  colour / shape / count match and the world CLIP's relevance of the renders to the bare request; the best ten
  sets by true gain and by predicted gain;
- with --truth, the same for the world's own renderer drawing each prompt (what a faithful SD would draw): how
  much of a fall in shape or relevance is the SD's and how much the phrases';
- per phrase: its marginal effect on the true and on the predicted aesthetic (and --other-aesthetic's), the mean
  over sets with it minus that without it: the phrases a policy rewarded by the predictor is pushed to wrongly.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from PIL import Image


def phrase_sets() -> list[tuple[str, ...]]:
    """Every choice of at most one phrase per style group, in the group order descriptions use."""
    from bp_ray.embedded.world.scenes import STYLE_GROUPS

    options = [(None, *phrases) for phrases in STYLE_GROUPS.values()]
    return [tuple(p for p in choice if p) for choice in itertools.product(*options)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--preset", default="world")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--styles", action="append", default=None, metavar="PHRASE,PHRASE",
                        help="judge only these phrase sets (repeat; '' is the bare prompt) instead of every set")
    parser.add_argument("--truth", action="store_true",
                        help="also judge the world renderer's images of each prompt ('truth' columns)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every set's row to FILE")
    parser.add_argument("--other-aesthetic", default=None, metavar="DIR",
                        help="another aesthetic predictor folder, scored beside the preset's ('other' columns)")
    args = parser.parse_args(argv)

    from bp_ray.config_loader import load_config
    from bp_ray.embedded.world.scenes import render_text
    from bp_ray.embedded.world.truth import world_truth_scores
    from bp_ray.eval.prompts import embedded_eval_prompts
    from bp_ray.models.loading import load_aesthetic, load_clip_relevance, load_diffusion
    from bp_ray.rewards.render import render_seeds, seeds_for

    cfg = load_config(args.preset, args.set)
    prompts = embedded_eval_prompts(cfg.data, args.prompts)
    seeds = seeds_for(args.seeds, cfg.rewards.seed_base)
    pipe = load_diffusion(cfg.models.diffusion, cfg.models, device="cpu", scheduler=cfg.eval.render.scheduler)
    scorer = load_aesthetic(cfg.models, device="cpu")
    scorers = {"predicted": scorer}
    clip = load_clip_relevance(cfg.models, device="cpu")
    if args.other_aesthetic:
        from bp_ray.models.aesthetic import load_aesthetic_scorer

        scorers["other"] = load_aesthetic_scorer(args.other_aesthetic, device="cpu")
    sets = [tuple(p.strip() for p in text.split(",") if p.strip()) for text in args.styles] if args.styles else \
        phrase_sets()
    if () not in sets:
        sets.insert(0, ())
    start = time.perf_counter()
    rows = []
    for styles in sets:
        texts = [", ".join((p, *styles)) for p in prompts]
        pixels = render_seeds(pipe, texts, seeds, cfg.eval.render)
        truth = world_truth_scores(pixels, prompts)  # judged against the user's request, not the rewrite
        flat = pixels.reshape(-1, *pixels.shape[-3:])
        images = [Image.fromarray(x) for x in flat]
        predicted = {name: float(np.mean(np.concatenate([s.score(images[i:i + 256])
                                                         for i in range(0, len(images), 256)])))
                     for name, s in scorers.items()}
        requests = [p for p in prompts for _ in seeds]
        row = {"styles": styles, "true": float(truth[..., 0].mean()), **predicted,
               "colour": float(np.nanmean(truth[..., 1])), "shape": float(np.nanmean(truth[..., 2])),
               "count": float(np.nanmean(truth[..., 3])), "relevance": float(np.mean(clip.score(images, requests)))}
        if args.truth:
            drawn = np.stack([[render_text(text, seed) for seed in seeds] for text in texts])
            judged = world_truth_scores(drawn, prompts)
            row |= {"truth true": float(judged[..., 0].mean()), "truth shape": float(np.nanmean(judged[..., 2])),
                    "truth colour": float(np.nanmean(judged[..., 1])),
                    "truth relevance": float(np.mean(clip.score([Image.fromarray(x) for x in
                                                                 drawn.reshape(-1, *drawn.shape[-3:])], requests)))}
        rows.append(row)
    seconds = time.perf_counter() - start
    bare = next(r for r in rows if not r["styles"])
    print(f"{len(prompts)} prompts x {len(seeds)} seeds x {len(sets)} phrase sets rendered in {seconds:.0f} s")
    print(f"bare prompts: true {bare['true']:.2f}, predicted {bare['predicted']:.2f}, colour {bare['colour']:.3f}, "
          f"shape {bare['shape']:.3f}, count {bare['count']:.3f}, relevance {bare['relevance']:.3f}")
    extra = ("truth true", "truth colour", "truth shape", "truth relevance") if args.truth else ()

    def show(title: str, key: str) -> None:
        print(f"\n{title}\n| styles | true gain | predicted gain | colour | shape | count | relevance |"
              f"{''.join(f' {name} |' for name in extra)}\n|---|---:|---:|---:|---:|---:|---:|{'---:|' * len(extra)}")
        for r in sorted(rows, key=lambda r: -r[key])[:10]:
            print(f"| {', '.join(r['styles']) or '(none)'} | {r['true'] - bare['true']:+.2f} | "
                  f"{r['predicted'] - bare['predicted']:+.2f} | {r['colour']:.3f} | {r['shape']:.3f} | "
                  f"{r['count']:.3f} | {r['relevance']:.3f} |{''.join(f' {r[name]:.3f} |' for name in extra)}")

    show("best ten sets by TRUE aesthetic", "true")
    kept = [r for r in rows if r["shape"] >= bare["shape"] - 0.03 and r["colour"] >= bare["colour"] - 0.03
            and r["relevance"] >= bare["relevance"] - 0.02]
    print(f"\n{len(kept)} of {len(rows)} sets keep colour and shape within 0.03 and relevance within 0.02 of the "
          "bare prompt's; the best of them by true aesthetic:")
    rows, every = kept, rows
    show("best ten sets that keep intent, by TRUE aesthetic", "true")
    rows = every
    shape_gap = np.array([r["shape"] - bare["shape"] for r in rows])
    relevance_gap = np.array([r["relevance"] - bare["relevance"] for r in rows])
    print(f"over the sets, the CLIP relevance's change correlates {np.corrcoef(shape_gap, relevance_gap)[0, 1]:.3f} "
          "with the shape match's")
    if args.json:
        import json

        with open(args.json, "w") as out:
            json.dump([{**r, "styles": list(r["styles"])} for r in rows], out, indent=1)
    show("best ten sets by PREDICTED aesthetic (what a policy rewarded by the predictor is drawn to)", "predicted")
    from bp_ray.embedded.world.scenes import STYLE_WORDS

    if args.styles:
        return 0
    keys = ("true", *scorers, "shape")
    print("\nmarginal effect of each phrase (sets with it minus sets without it)\n"
          f"| phrase | {' | '.join(keys)} |\n|---|{'---:|' * len(keys)}")
    for phrase in STYLE_WORDS:
        with_, without = ([r for r in rows if (phrase in r["styles"]) == flag] for flag in (True, False))
        diff = [np.mean([r[k] for r in with_]) - np.mean([r[k] for r in without]) for k in keys]
        print(f"| {phrase} | {' | '.join(f'{d:+.3f}' for d in diff)} |")
    for name in scorers:
        truth, guess = np.array([r["true"] for r in rows]), np.array([r[name] for r in rows])
        print(f"{name}: Pearson r with the true aesthetic over the {len(rows)} sets "
              f"{np.corrcoef(truth, guess)[0, 1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
