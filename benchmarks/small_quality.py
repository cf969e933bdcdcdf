"""The `small` preset end to end on this machine: SmolLM2-135M-Instruct trained on real prompts, and its rewrites
judged as text on PartiPrompts and the unseen half of DrawBench.

    python benchmarks/small_quality.py --run runs/small                # run the pipeline there, then judge it
    python benchmarks/small_quality.py --run runs/small --skip-pipeline  # judge a finished run again
    python benchmarks/small_quality.py --run runs/small-gemma --policy gguf:gemma3-270m --skip-ablations  # Gemma

A policy other than the preset's is trained and judged with the paper's plain instruction ("Instruction: ...
Input: ... Output:"): the preset's instruction is SmolLM2's own chat template. The data stage's rewriter stays
the preset's (SmolLM2), so both runs train on the same kind of pairs.

Prints: each stage's wall time; SFT steps, batch, sequence length and tokens/s; the reward model's held-out fit
against predicting the mean (the style classifier: accuracy against the majority class, AUC); PPO steps,
samples/s and the held-out reward; then `bp-ray eval-text`'s table with 95% intervals (subject kept, content
similarity by all-MiniLM-L6-v2, tags, words, repetition, RM score for original / base / SFT / PPO) at the
preset's decoding, the same for SFT and PPO without keep_colours, and without any decoding control (greedy as
before issue 27), PPO against SFT per prompt, the rewrites cut at the token limit, and 10 rewrites side by side:
without and with the decoding controls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from bp_ray.summaries import rm_summary

# The small preset reads its prompt pools from $BP_RAY_PROMPTS; this project's machines keep them in ../shared.
os.environ.setdefault("BP_RAY_PROMPTS", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"))


def run_pipeline(run: Path, sets: list[str]) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "bp_ray.cli", "pipeline", "--preset", "small", "--out", str(run)]
    for item in sets:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


def training_figures(run: Path, cfg) -> None:
    for stage in ("data", "rewards", "sft", "rm", "ppo", "eval"):
        print(f"  {stage:<8}{manifest(run, stage)['wall_time_s']:9.1f} s")
    sft, sft_metrics = manifest(run, "sft"), pd.read_csv(run / "sft" / "metrics" / "metrics.csv")
    print(f"SFT: {sft['steps']} steps x batch {cfg.sft.batch_size} on {sft['pairs']} pairs "
          f"({sft['held_out_pairs']} held out), max length {cfg.sft.max_length}, {cfg.sft.deepspeed.precision} "
          f"ZeRO-{cfg.sft.deepspeed.zero_stage}: {sft['wall_time_s'] / 60:.1f} min, "
          f"{sft_metrics['perf/tokens_per_s'].median():.0f} tokens/s (median step); train loss of the first step "
          f"{sft_metrics['loss/train'].iloc[0]:.3f}, held-out loss at steps "
          + ", ".join(f"{int(step)}: {loss:.3f}" for step, loss in sft_metrics[["step", "loss/eval"]].dropna().values))
    print(f"{rm_summary(manifest(run, 'rm'), run / 'rm')} ({manifest(run, 'rm')['wall_time_s'] / 60:.1f} min)")
    ppo, ppo_metrics = manifest(run, "ppo"), pd.read_csv(run / "ppo" / "metrics" / "metrics.csv")
    tokens_per_s = (ppo_metrics["response_tokens"] * ppo_metrics["perf/samples_per_s"]).median()
    print(f"PPO: {ppo['steps']} steps x {cfg.ppo.rollout_batch_size} rollouts: {ppo['wall_time_s'] / 60:.1f} min, "
          f"{ppo_metrics['perf/samples_per_s'].median():.2f} samples/s, {tokens_per_s:.1f} response tokens/s; "
          f"held-out reward {ppo['initial_eval']['eval/reward']:.3f} (SFT) -> "
          f"{ppo['final_metrics']['eval/reward']:.3f}, KL {ppo_metrics['kl'].iloc[-1]:.2f}")
    guards = [g for g in ("guard/missing_eos", "guard/colour_changed", "guard/intent_kept") if g in ppo_metrics]
    print("PPO rollouts, first -> last step: " + ", ".join(
        f"{g.split('/')[1]} {ppo_metrics[g].iloc[0]:.3f} -> {ppo_metrics[g].iloc[-1]:.3f}" for g in guards))


def cut_shares(results: dict, checkpoints: dict[str, Path], max_new_tokens: int) -> None:
    """Share of each model's rewrites that ran to max_new_tokens (re-encoded with its tokenizer; one token of slack
    for a re-encoding that merges differently): cut mid-sentence rather than finished."""
    from transformers import AutoTokenizer

    rows = pd.read_json(Path(results["out_dir"]) / "rewrites_text.jsonl", lines=True)
    for system in ("sft", "ppo"):
        tokenizer = AutoTokenizer.from_pretrained(checkpoints[system])
        outputs = rows.loc[rows["system"] == system, "output"]
        cut = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) >= max_new_tokens - 1 for o in outputs]
        print(f"{system}: {sum(cut)} of {len(cut)} rewrites at the {max_new_tokens}-token limit")


def examples(results: dict, before: dict, count: int) -> None:
    """`count` prompts, half from each set in file order: each system's rewrite, and SFT's and PPO's without the
    decoding controls."""
    per_set = {name: [e for e in results["examples"] if e["set"] == name] for name in results["sets"]}
    chosen = [e for name in per_set for e in per_set[name][: count // len(per_set)]]
    earlier = {(e["set"], e["prompt"]): e for e in before["examples"]}
    for example in chosen:
        print(f"\n[{example['set']}] {example['prompt']}")
        for system in results["systems"][1:]:
            if system in earlier[example["set"], example["prompt"]]:
                print(f"  {system + ', no controls':<17} {earlier[example['set'], example['prompt']][system]}")
            print(f"  {system:<17} {example[system]}")


def ppo_against_sft(results: dict) -> None:
    """Per prompt, PPO minus SFT on the reward and the content similarity (paired: same prompts)."""
    from bp_ray.eval.stats import paired_comparison

    rows = pd.read_json(Path(results["out_dir"]) / "rewrites_text.jsonl", lines=True)
    for metric in ("rm_score", "content_similarity"):
        if metric not in rows:
            continue
        table = rows.pivot_table(index=["set", "prompt"], columns="system", values=metric)
        result = paired_comparison(table["ppo"], table["sft"], system="ppo", baseline="sft", metric=metric)
        print(f"PPO vs SFT, {metric}: mean difference {result.mean_diff:+.4f} +- {result.ci:.4f} (95%), "
              f"{result.wins} wins / {result.ties} ties / {result.losses} losses of {result.n}, "
              f"Wilcoxon p {result.p_wilcoxon:.3g}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/small"))
    parser.add_argument("--skip-pipeline", action="store_true", help="judge the finished run in --run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--policy", default=None, metavar="SPEC", help="another policy (gguf:gemma3-270m), "
                        "with the paper's plain instruction")
    parser.add_argument("--skip-ablations", action="store_true", help="judge only at the preset's decoding (no "
                        "runs without keep_colours or without any decoding control, no side-by-side rewrites)")
    args = parser.parse_args()
    if args.policy:
        from bp_ray.config import PAPER_INSTRUCTION

        args.set = [f"models.policy={args.policy}", f"sft.instruction={json.dumps(PAPER_INSTRUCTION)}", *args.set]

    from bp_ray.config_loader import load_config
    from bp_ray.eval.systems import checkpoint_model_dir
    from bp_ray.eval.text_quality import format_table, run_text_evaluation
    from bp_ray.models.loading import resolve_model
    from bp_ray.summaries import text_eval_summary

    cfg = load_config("small", args.set)
    if not args.skip_pipeline:
        print(f"small pipeline: {run_pipeline(args.run, args.set):.1f} s wall")
    training_figures(args.run, cfg)
    checkpoints = {"base": Path(resolve_model(cfg.models.policy, cfg.models)),
                   "sft": checkpoint_model_dir(args.run / "sft"), "ppo": checkpoint_model_dir(args.run / "ppo")}
    results = run_text_evaluation(cfg, args.run / "eval_text", cfg.eval.text_prompts, checkpoints,
                                  args.run / "rm", args.run / "data", cfg.eval.text_num_prompts)
    results["out_dir"] = str(args.run / "eval_text")
    print(text_eval_summary(results))
    print(f"decoding {results['decoding']}; rewrite time per system (s): {results['rewrite_seconds']}")
    print(format_table(results))
    ppo_against_sft(results)
    cut_shares(results, checkpoints, cfg.eval.max_new_tokens)
    if args.skip_ablations:
        return 0

    colours = load_config("small", [*args.set, "eval.decoding.keep_colours=false"])
    free = run_text_evaluation(colours, args.run / "eval_text_no_keep_colours", colours.eval.text_prompts,
                               {k: checkpoints[k] for k in ("sft", "ppo")}, args.run / "rm", args.run / "data",
                               colours.eval.text_num_prompts)
    print(f"\nwithout keep_colours (decoding {free['decoding']}):")
    print(format_table(free))

    plain = load_config("small", [*args.set, "eval.decoding.no_repeat_ngram_size=0",
                                  "eval.decoding.repetition_penalty=1.0", "eval.decoding.keep_colours=false"])
    before = run_text_evaluation(plain, args.run / "eval_text_no_controls", plain.eval.text_prompts,
                                 {k: checkpoints[k] for k in ("sft", "ppo")}, args.run / "rm", args.run / "data",
                                 plain.eval.text_num_prompts)
    print(f"\nwithout any decoding control (decoding {before['decoding']}):")
    print(format_table(before))
    examples(results, before, 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
