"""One-line summaries of finished stages, read from their manifests: what the stage commands and the pipeline
print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bp_ray.config import PipelineConfig
from bp_ray.layout import RunLayout


def zoo_summary(cfg: PipelineConfig, zoo: Path | None) -> str:
    from bp_ray.models.model_cache import default_zoo_dir

    if zoo is None:
        return f"models: from the hub / local paths (zoo cache {default_zoo_dir(cfg.models)} not needed)"
    manifest = json.loads((zoo / "zoo.json").read_text())
    params = sum(manifest["parameters"].values())
    return (f"models: {zoo.name} zoo at {zoo} ({manifest['bytes'] / 1e6:.1f} MB, {params:,} parameters, "
            f"roles {', '.join(manifest['parameters'])})")


def corpus_summary(summary: dict) -> str:
    if summary.get("not_used"):
        return f"corpus: not used (data.source is {summary['source']})"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary["kind_counts"].items()))
    return (f"corpus: {summary['num_rows']} rows ({kinds}), {summary['num_images']} images in "
            f"{summary['num_parts']} part(s), {summary['bytes_on_disk'] / 1e6:.1f} MB at {summary['out_dir']}")


def data_summary(manifest: dict, out: Path) -> str:
    per_source = ", ".join(f"{name} {info['out']}/{info['candidates']}" for name, info in manifest["pairs"].items())
    quality = manifest["quality"]
    return (f"data: {manifest['pairs_out']} pairs ({per_source} kept/candidates) from {manifest['rows_in']} rows "
            f"(low {quality['low']}, high {quality['high']}, neither {quality['neither']}; dropped "
            f"{sum(manifest['rows_dropped'].values())}) in {manifest['wall_time_s']} s -> {out}")


def rewards_summary(manifest: dict, out: Path) -> str:
    return (f"rewards: {manifest['rows']} prompts of {manifest['pairs']} pairs x {manifest['num_seeds']} seeds "
            f"({manifest['prompts_rendered']} rendered, {manifest['prompts_from_cache']} from the cache) in "
            f"{manifest['wall_time_s']} s -> {out}")


def train_progress(manifest: dict) -> str:
    done = f"{manifest['steps']}/{manifest['total_steps']} steps"
    return done if manifest["complete"] else f"{done} (stopped: go on with --resume)"


def sft_summary(manifest: dict) -> str:
    final = manifest["final_metrics"]
    return (f"sft: {train_progress(manifest)} on {manifest['pairs']} pairs ({manifest['held_out_pairs']} held out), "
            f"train loss {final['loss/train']:.3f}, held-out loss {final.get('loss/eval', float('nan')):.3f} in "
            f"{manifest['wall_time_s']} s -> {manifest['model']}")


def rm_summary(manifest: dict, out: Path) -> str:
    metrics = manifest["final_metrics"]
    # the style head's 0 / 1 labels make its MSE the Brier score of a probability
    heads = "; ".join(
        f"{head}: held-out {'Brier' if head == 'style' else 'MSE'} {metrics[f'rm/{head}/mse']:.4g} vs predict-the-mean "
        f"{metrics[f'rm/{head}/mean_baseline_mse']:.4g}, Pearson {metrics[f'rm/{head}/pearson']:.3f}, "
        f"Spearman {metrics[f'rm/{head}/spearman']:.3f}"
        for head in ("pickscore", "aesthetic", "style") if f"rm/{head}/mse" in metrics)
    if "rm/style/auc" in metrics:
        heads += (f", accuracy {metrics['rm/style/accuracy']:.3f} vs majority class "
                  f"{metrics['rm/style/majority_accuracy']:.3f}, AUC {metrics['rm/style/auc']:.3f}")
    state = "" if manifest["complete"] else " (stopped: go on with --resume)"
    kind = "style classifier" if manifest.get("target") == "style" else manifest["heads"]
    return f"rm: {kind} on {manifest['label_rows']} labelled prompts{state}; {heads} -> {out}"


def ppo_summary(manifest: dict) -> str:
    final, initial = manifest["final_metrics"], manifest.get("initial_eval", {})
    before = f"{initial['eval/reward']:.4g} (SFT) -> " if "eval/reward" in initial else ""
    return (f"ppo: {train_progress(manifest)}, held-out reward {before}{final['eval/reward']:.4g}, KL "
            f"{final['kl']:.3g} (coef {manifest['kl_coef']:.3g}) in {manifest['wall_time_s']} s -> {manifest['model']}")


def _number(value: float | None) -> float:
    return float("nan") if value is None else value  # results.json writes nan as null


def eval_summary(out: Path) -> str:
    """The results table as text, and where the report is."""
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"] + ["words"]
    lines = [f"eval: {results['prompts']['count']} prompts ({results['prompts']['source']}) x "
             f"{len(results['seeds'])} seeds, scored against the user prompt",
             f"  {'system':<10}" + "".join(f"{m:>20}" for m in metrics)]
    for row in results["table"]:
        cells = "".join(f"{row[f'{m}_mean']:>11.4g} ± {_number(row[f'{m}_ci']):<6.2g}" for m in metrics)
        lines.append(f"  {row['system']:<10}{cells}")
    wins = [c for c in results["comparisons"] if c["baseline"] == "original" and c["metric"] == "reward"]
    if wins:
        lines.append("  win rate on reward over original: " + ", ".join(
            f"{c['system']} {c['win_rate']:.2f} (Wilcoxon p={_number(c['p_wilcoxon']):.2g})" for c in wins))
    lines.append(f"  report: {out / 'report.html'}")
    return "\n".join(lines)


def example_rewrites(path: Path, count: int = 3) -> str:
    """A few user prompts with their SFT and PPO rewrites, from an evaluation's rewrites.jsonl."""
    lines = ["examples (original -> sft -> ppo):"]
    with path.open() as f:
        for line, _ in zip(f, range(count), strict=False):
            row = json.loads(line)
            lines.append("  " + " -> ".join(repr(row[s]) for s in ("prompt", "sft", "ppo") if s in row))
    return "\n".join(lines)


def stage_summary(stage: str, manifest: dict, out: Path) -> str:
    """The one-line (eval: a table) summary of a finished stage, from its manifest."""
    if stage == "corpus":
        return corpus_summary(manifest)
    if stage in ("data", "rewards", "rm"):
        return {"data": data_summary, "rewards": rewards_summary, "rm": rm_summary}[stage](manifest, out)
    if stage in ("sft", "ppo"):
        return {"sft": sft_summary, "ppo": ppo_summary}[stage](manifest)
    return eval_summary(out)


def text_eval_summary(results: dict) -> str:
    sets = ", ".join(f"{name} {info['count']} ({info['trained_left_out']} trained left out)"
                     for name, info in results["sets"].items())
    return (f"eval-text: {sets} x {', '.join(results['systems'])} in {results['wall_time_s']} s"
            f"{'' if results['rm'] else ' (no reward model: no rm_score)'}")


def stage_outcome(run: Any) -> str:
    """The console's line for a finished stage (a pipeline.StageRun): how it ended and how long it took."""
    if run.action == "skipped":
        return "skipped (done earlier with this config)"
    if not run.manifest.get("complete", True):
        steps = f" at {run.manifest['steps']}/{run.manifest['total_steps']} steps" if "steps" in run.manifest else ""
        return f"stopped{steps} after {run.seconds:.1f} s (go on with --resume)"
    return f"{'resumed, done' if run.action == 'resumed' else 'done'} in {run.seconds:.1f} s"


def truncation_summary(layout: RunLayout) -> str | None:
    """How many prompts the text encoder saw cut at its window (77 tokens for SD 1.x), from the rewards manifest
    and the evaluation's results; None when none were. diffusers warns about every batch that holds one, in the
    workers' logs: this is the count that matters."""
    parts, total, limit = [], 0, None
    rewards = _read(layout.manifest("rewards")).get("long_prompts") or {}
    if rewards.get("mode") == "truncate" and rewards.get("over_limit"):
        total += rewards["over_limit"]
        parts.append(f"{rewards['over_limit']} of {rewards['prompts']} reward prompts")
        limit = rewards["limit_tokens"]
    results = _read(layout.stage_dir("eval") / "results.json").get("long_prompts") or {}
    over = {system: info["over_limit"] for system, info in results.get("systems", {}).items() if info["over_limit"]}
    if results.get("mode") == "truncate" and over:
        total += sum(over.values())
        parts.append("eval prompts: " + ", ".join(f"{system} {n}" for system, n in over.items()))
        limit = limit or results["limit_tokens"]
    if not total:
        return None
    return (f"{total} prompt{'s' if total != 1 else ''} truncated at {limit} tokens by the text encoder "
            f"({'; '.join(parts)}); data.render.long_prompts=chunked / eval.render.long_prompts=chunked encode "
            "them whole")


def logs_summary(folder: Path, warnings: int) -> str:
    return (f"logs: {folder} (bp-ray.log: the driver's logging, {warnings} warning(s); output.log: Ray, its workers, "
            "DeepSpeed and the other libraries)")


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
