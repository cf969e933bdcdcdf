"""Does the world pipeline make prettier pictures OF WHAT THE USER ASKED FOR? Every figure of issue 20, judged by
the miniature world's ground truth (pixels, no model), on a finished world run.

    python benchmarks/intent_quality.py --run runs/world               # judge a finished world run
    python benchmarks/intent_quality.py --run runs/world --pipeline    # run `bp-ray pipeline --preset world` first
    python benchmarks/intent_quality.py --compare before=runs/w0 after=runs/w1 ...   # one row per run (per change)

Prints: pair faithfulness per pair source (do low and high name the same coloured shapes, by ground truth); the
evaluation table with 95% CIs (true aesthetic, colour / shape / count match, CLIP relevance, words); paired tests
of PPO against the original and SFT prompts; the share of distinct PPO rewrites; each target of the issue with
PASS / FAIL; ten example rewrites. `--compare` prints the per-change table over several runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd

CHECKS = ("colour_match", "shape_match", "count_match")
COLUMNS = ("true_aesthetic", *CHECKS, "relevance", "words")


def faithful(low: str, high: str) -> bool:
    """Low and high name the same coloured shapes (as a multiset), read by the world's description parser."""
    from bp_ray.embedded.world.scenes import parse_description

    def objects(text: str) -> Counter:
        return Counter((o.colour, o.shape) for o in parse_description(text).objects)

    return objects(low) == objects(high)


def pair_faithfulness(run: Path) -> dict[str, tuple[int, float]]:
    """pair source -> (pairs, share whose low prompt names the coloured shapes of the scene its row shows), and
    "all". The scene is the corpus row's own prompt (what its image was rendered from), not the pair's high prompt,
    which data.high_subject_from_low rewrites from the low one."""
    files = sorted((run / "data").glob("part-*.parquet"))
    pairs = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()
    if pairs.empty:
        return {}
    corpus = run / "corpus" / "metadata.parquet"
    scenes = pd.read_parquet(corpus).set_index("image_name")["prompt"] if corpus.exists() else pd.Series(dtype=str)
    shown = [scenes.get(row_id, high) for row_id, high in zip(pairs["row_id"], pairs["high"], strict=True)]
    pairs = pairs.assign(faithful=[faithful(low, scene) for low, scene in zip(pairs["low"], shown, strict=True)])
    out = {source: (len(group), float(group["faithful"].mean())) for source, group in pairs.groupby("pair_source")}
    out["all"] = (len(pairs), float(pairs["faithful"].mean()))
    return out


def distinct_share(run: Path, system: str) -> tuple[int, int]:
    rows = [json.loads(line) for line in (run / "eval" / "rewrites.jsonl").read_text().splitlines()]
    return len({r[system] for r in rows}), len({r["prompt"] for r in rows})


def comparison(results: dict, system: str, baseline: str, metric: str) -> dict:
    return next((c for c in results["comparisons"] if c["system"] == system and c["baseline"] == baseline
                 and c["metric"] == metric), {})


def summary(run: Path) -> dict:
    """The figures of one run that the targets and the per-change table need."""
    results = json.loads((run / "eval" / "results.json").read_text())
    table = {row["system"]: row for row in results["table"]}
    out = {"results": results, "table": table, "faithfulness": pair_faithfulness(run)}
    if "ppo" in table:
        out["distinct"] = distinct_share(run, "ppo")
    return out


def _cell(row: dict, metric: str) -> str:
    ci = row.get(f"{metric}_ci")
    return f"{row[f'{metric}_mean']:.3f} ± {ci:.3f}" if ci is not None else f"{row[f'{metric}_mean']:.3f}"


def print_run(run: Path) -> None:
    figures = summary(run)
    results, table = figures["results"], figures["table"]
    print(f"run {run}: {results['prompts']['count']} held-out plain prompts x {len(results['seeds'])} seeds")
    print("pair faithfulness (low and high name the same coloured shapes, by ground truth):")
    for source, (count, share) in figures["faithfulness"].items():
        print(f"  {source:<10}{count:6d} pairs  {share:7.1%} faithful")
    print(f"{'system':<10}" + "".join(f"{m:>20}" for m in COLUMNS))
    for system, row in table.items():
        print(f"{system:<10}" + "".join(f"{_cell(row, m):>20}" for m in COLUMNS))
    print("paired tests (per prompt, mean over seeds):")
    for system, baseline in (("ppo", "original"), ("ppo", "sft"), ("sft", "original")):
        for metric in ("true_aesthetic", *CHECKS, "relevance"):
            c = comparison(results, system, baseline, metric)
            if c and c.get("p_t") is not None:
                print(f"  {system} vs {baseline:<9} {metric:<15} diff {c['mean_diff']:+.3f}  win rate "
                      f"{c['win_rate']:.2f}  p(t) {c['p_t']:.3g}")
    if "ppo" not in table:
        return
    ppo, sft, original = table["ppo"], table["sft"], table["original"]
    distinct, requests = figures["distinct"]
    vs_sft = comparison(results, "ppo", "sft", "true_aesthetic")
    targets = [
        ("true aesthetic: PPO >= original + 1.5",
         ppo["true_aesthetic_mean"] >= original["true_aesthetic_mean"] + 1.5,
         f"{ppo['true_aesthetic_mean']:.2f} vs {original['true_aesthetic_mean']:.2f} + 1.5"),
        ("true aesthetic: PPO > SFT, p < 0.05",
         vs_sft.get("mean_diff", 0) > 0 and (vs_sft.get("p_t") or 1) < 0.05,
         f"diff {vs_sft.get('mean_diff', float('nan')):+.3f}, p {vs_sft.get('p_t')}"),
        *[(f"{m}: {s} >= original - 0.03", table[s][f"{m}_mean"] >= original[f"{m}_mean"] - 0.03,
           f"{table[s][f'{m}_mean']:.3f} vs {original[f'{m}_mean']:.3f}") for m in CHECKS for s in ("sft", "ppo")],
        ("CLIP relevance: PPO >= original - 0.02", ppo["relevance_mean"] >= original["relevance_mean"] - 0.02,
         f"{ppo['relevance_mean']:.3f} vs {original['relevance_mean']:.3f}"),
        ("distinct PPO rewrites >= 90% of distinct requests", distinct >= 0.9 * requests,
         f"{distinct} of {requests}"),
        ("pair faithfulness >= 95%", figures["faithfulness"].get("all", (0, 0.0))[1] >= 0.95,
         f"{figures['faithfulness'].get('all', (0, 0.0))[1]:.1%}"),
    ]
    print("targets:")
    for name, passed, detail in targets:
        print(f"  {'PASS' if passed else 'FAIL'}  {name:<52} {detail}")
    del sft
    rows = [json.loads(line) for line in (run / "eval" / "rewrites.jsonl").read_text().splitlines()]
    print("example rewrites (first five one-object and five two-object requests):")
    singles = [r for r in rows if " and " not in r["prompt"]][:5]
    doubles = [r for r in rows if " and " in r["prompt"]][:5]
    for r in singles + doubles:
        print(f"  {r['prompt']!r}\n      sft: {r.get('sft', '')!r}\n      ppo: {r.get('ppo', '')!r}")


def print_compare(runs: list[tuple[str, Path]]) -> None:
    metrics = ("true_aesthetic", *CHECKS, "relevance")
    print(f"{'change':<24}{'pairs':>7}{'faithful':>10}" + "".join(f"{'sft ' + m[:9]:>15}{'ppo ' + m[:9]:>15}"
                                                                   for m in metrics) + f"{'distinct':>10}")
    for label, run in runs:
        figures = summary(run)
        table = figures["table"]
        count, share = figures["faithfulness"].get("all", (0, float("nan")))
        cells = "".join(f"{table.get('sft', {}).get(f'{m}_mean', float('nan')):>15.3f}"
                        f"{table.get('ppo', {}).get(f'{m}_mean', float('nan')):>15.3f}" for m in metrics)
        distinct, requests = figures.get("distinct", (0, 0))
        original = table["original"]
        print(f"{label:<24}{count:>7}{share:>10.1%}{cells}{f'{distinct}/{requests}':>10}")
    print("original prompts: " + ", ".join(f"{m} {original[f'{m}_mean']:.3f}" for m in metrics))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a world run folder (bp-ray pipeline --preset world --out RUN)")
    parser.add_argument("--pipeline", action="store_true", help="run the world pipeline into --run first")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--compare", nargs="+", metavar="LABEL=RUN", help="one table row per finished run")
    args = parser.parse_args()
    if args.compare:
        print_compare([(item.split("=", 1)[0], Path(item.split("=", 1)[1])) for item in args.compare])
        return 0
    if args.run is None:
        parser.error("--run or --compare is required")
    if args.pipeline:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "bp_ray.cli", "pipeline", "--preset", "world", "--out", str(args.run)]
        subprocess.run(cmd + [arg for item in args.set for arg in ("--set", item)], check=True)
        print(f"world pipeline: {time.perf_counter() - start:.1f} s wall")
    print_run(args.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
