"""`bp-ray train rm`: regress the seed-averaged PickScore and aesthetic labels with MSE (paper Section 4.2), or,
with rm.target=style, a text-only style score: SD-style prompts 1, plain captions 0, with MSE on the 0 / 1 labels
(rm.style_loss=brier: the Brier score of a classifier) or cross-entropy on log-odds (logistic).

rm.heads=two_models trains one backbone per score, as the paper does (out/pickscore/model, out/aesthetic/model);
shared_backbone trains one backbone with two scalar heads (out/shared/model). Each model is one Ray Train run of
the shared DeepSpeed loop; the held-out split is by pair, so a pair's low and high prompt stay on one side.
`LearnedReward.load(out)` (models/reward_model.py) gives PPO and evaluation the combined reward.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bp_ray.config import ClusterConfig, ModelsConfig, RewardsConfig, RMConfig
from bp_ray.data import columns as C
from bp_ray.layout import SUCCESS, write_manifest
from bp_ray.models.reward_heads import HEADS, STYLE, label_column
from bp_ray.train.reward_data import fit_head_spec, read_labels, read_style_labels


def model_groups(rm: RMConfig) -> dict[str, list[str]]:
    """Name of each model to train -> the heads it carries."""
    if rm.target == "style":
        return {STYLE: [STYLE]}
    if rm.heads == "two_models":
        return {head: [head] for head in HEADS}
    return {"shared": list(HEADS)}


def head_inputs(rm: RMConfig, heads: list[str]) -> list[str]:
    inputs = {"pickscore": rm.pickscore_input, "aesthetic": rm.aesthetic_input, STYLE: "high"}
    return [inputs[head] for head in heads]


def training_labels(rm: RMConfig, labels_dir: Path) -> tuple[Any, int]:
    """(label rows, rows dropped): the rendered prompts' scores, or the style files' prompts."""
    if rm.target == "style":
        return read_style_labels(rm.style_positive, rm.style_negative, rm.style_rows)
    return read_labels(labels_dir, rm.label_roles)


def evaluate_heads(engine: Any, examples: list, spec: Any, batch_size: int, pad_id: int,
                   train_means: list[float]) -> dict[str, float]:
    """Held-out loss (as trained) and, per head, MSE / Pearson / Spearman in the scorer's units against the
    predict-the-training-mean baseline; a log-odds head's on its probability, as a Brier score."""
    import torch

    from bp_ray.train.reward_data import classification_report, collate_rm, head_loss, regression_report

    if not examples:
        return {}
    engine.eval()
    predictions, targets = [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate_rm(examples[start:start + batch_size], pad_id)
            logits = engine(input_ids=batch["input_ids"].to(engine.device),
                            attention_mask=batch["attention_mask"].to(engine.device)).logits
            predictions.append(logits.float().cpu())
            targets.append(batch["targets"])
    engine.train()
    predicted, target = torch.cat(predictions), torch.cat(targets)
    metrics = {"loss/eval": float(head_loss(spec)(predicted, target))}
    units = spec.to_probability(spec.to_units(predicted.numpy()))
    actual = spec.to_units(target.numpy())
    for column, head in enumerate(spec.heads):
        known = np.isfinite(actual[:, column])
        metrics.update(regression_report(head, units[known, column], actual[known, column], train_means[column]))
        if head == STYLE:
            metrics.update(classification_report(units[known, column], actual[known, column]))
    return metrics


def rm_worker_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: one reward model (one or two heads) from the config it receives."""
    from bp_ray.train.loop import TrainTask, train_on_worker, worker_device

    rm: RMConfig = config["rm"]
    device = worker_device(rm.resources)
    import torch

    from bp_ray.models.reward_model import load_regressor
    from bp_ray.train.reward_data import build_rm_examples, collate_rm, head_loss
    from bp_ray.train.sft_data import split_held_out

    torch.manual_seed(rm.seed)
    heads = config["heads"]
    labels, _ = training_labels(rm, Path(config["labels_dir"]))
    held_out = split_held_out(labels[C.PAIR_ID].tolist(), rm.eval_fraction, rm.seed)
    train_rows, eval_rows = labels[~held_out], labels[held_out]
    spec = fit_head_spec(train_rows, heads, head_inputs(rm, heads), log_odds=rm.target == "style" and
                         rm.style_loss == "logistic")
    train_loss = head_loss(spec)
    means = [float(train_rows[label_column(head)].mean()) for head in heads]
    model, tokenizer = load_regressor(config["model"], config["models"], len(heads), device)
    train = build_rm_examples(tokenizer, train_rows, spec, rm.max_length)
    evaluation = build_rm_examples(tokenizer, eval_rows, spec, rm.max_length)
    pad = tokenizer.pad_token_id

    def loss(engine: Any, examples: list) -> tuple[Any, int]:
        batch = collate_rm(examples, pad)
        logits = engine(input_ids=batch["input_ids"].to(engine.device),
                        attention_mask=batch["attention_mask"].to(engine.device)).logits
        return train_loss(logits, batch["targets"].to(engine.device)), int(batch["attention_mask"].sum())

    def save_model(folder: Path, state_dict: dict | None) -> None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        spec.save(folder)

    model.train()
    task = TrainTask(model=model, examples=train, loss=loss, save_model=save_model,
                     evaluate=lambda engine: evaluate_heads(engine, evaluation, spec, rm.batch_size, pad, means))
    train_on_worker(task, rm, Path(config["metrics_dir"]), f"rm:{config['name']}")


def run_rm(rm: RMConfig, rewards: RewardsConfig, models: ModelsConfig, cluster: ClusterConfig, labels_dir: Path,
           out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train every reward model `rm` asks for on models.rm_backbone; returns the manifest (out_dir/manifest.json),
    which records rewards.alpha for the learned reward that reads it."""
    from bp_ray.models.loading import resolve_model
    from bp_ray.train.loop import finish_stage, fit

    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUCCESS).unlink(missing_ok=True)
    labels, dropped = training_labels(rm, labels_dir)  # fail here, clearly, not in every worker
    backbone = resolve_model(models.rm_backbone, models)
    parts, complete = {}, True
    for name, heads in model_groups(rm).items():
        model_out = out_dir / name
        model_out.mkdir(exist_ok=True)
        if not resume:
            shutil.rmtree(model_out / "metrics", ignore_errors=True)
        loop_config = {"rm": rm, "models": models, "labels_dir": str(Path(labels_dir).resolve()), "model": backbone,
                       "heads": heads, "name": name, "metrics_dir": str(model_out / "metrics")}
        checkpoint, state, storage = fit(cluster, f"rm-{name}", rm_worker_loop, loop_config, rm.resources,
                                         model_out, resume)
        part = finish_stage(f"rm-{name}", model_out, checkpoint, state, {
            "heads": heads, "checkpoints": storage}, started)
        parts[name] = part
        complete = complete and part["complete"]
    manifest = {
        "stage": "rm", "target": rm.target, "heads": rm.heads, "alpha": rewards.alpha, "max_length": rm.max_length,
        "style_loss": rm.style_loss if rm.target == "style" else None,
        "models": {name: f"{name}/model" for name in parts}, "complete": complete,
        "inputs": {h: i for heads in model_groups(rm).values() for h, i in zip(heads, head_inputs(rm, heads),
                                                                                 strict=True)},
        "label_rows": len(labels), "label_rows_dropped": dropped,
        "label_means": {h: float(labels[label_column(h)].mean()) for heads in model_groups(rm).values()
                        for h in heads},
        "final_metrics": {k: v for part in parts.values() for k, v in part["final_metrics"].items()
                          if k.startswith("rm/")},
        "parts": {name: part["model"] for name, part in parts.items()}, "backbone": models.rm_backbone,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    return write_manifest(out_dir, manifest)
