"""`bp-ray train sft`: instruction + low prompt -> high prompt on Ray Train + DeepSpeed (paper Section 4.1).

Each Ray Train worker wraps the causal LM in a DeepSpeed engine built from the bp-ray config (gloo on CPU, NCCL on
GPUs: the same code); `loop.py` holds the steps, checkpoints and resume. The final model is exported to
<out>/model with `save_pretrained`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bp_ray.config import ClusterConfig, ModelsConfig, SFTConfig
from bp_ray.data import columns as C
from bp_ray.layout import SUCCESS


def read_pairs_frame(pairs_dir: Path) -> pd.DataFrame:
    files = sorted(Path(pairs_dir).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no pair files (part-*.parquet) in {pairs_dir}: run `bp-ray data generate` first")
    pairs = pd.concat([pd.read_parquet(f, columns=[C.PAIR_ID, C.LOW, C.HIGH]) for f in files], ignore_index=True)
    return pairs.sort_values(C.PAIR_ID, kind="stable").reset_index(drop=True)  # file order must not matter


def lm_loss(engine: Any, examples: list, pad_id: int) -> tuple[Any, int]:
    """Mean cross-entropy over the target tokens of a batch (prompt tokens carry IGNORE_INDEX labels); the engine
    wraps a TargetTokenLoss, whose forward is that loss."""
    from bp_ray.train.sft_data import collate

    batch = {k: v.to(engine.device) for k, v in collate(examples, pad_id).items()}
    return engine(**batch), int(batch["attention_mask"].sum())


def eval_lm_loss(engine: Any, examples: list, batch_size: int, pad_id: int) -> float:
    """Held-out loss per target token (NaN without held-out examples)."""
    import torch

    from bp_ray.train.sft_data import IGNORE_INDEX, collate

    if not examples:
        return float("nan")
    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(engine.device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
            # Labels are shifted by one inside the loss: the first label never counts.
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(engine(**batch)) * tokens
            count += tokens
    engine.train()
    return total / max(count, 1)


def sft_worker_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: build the task from the config it receives (no globals) and train."""
    from bp_ray.train.loop import TrainTask, train_on_worker, worker_device

    sft: SFTConfig = config["sft"]
    device = worker_device(sft.resources)
    import torch

    from bp_ray.models.loading import load_causal_lm
    from bp_ray.train.sft_data import build_examples, pack_examples, split_held_out
    from bp_ray.train.token_logprobs import TargetTokenLoss

    torch.manual_seed(sft.seed)
    pairs = read_pairs_frame(Path(config["pairs_dir"]))
    held_out = split_held_out(pairs[C.PAIR_ID].tolist(), sft.eval_fraction, sft.seed)
    model, tokenizer = load_causal_lm(config["model"], config["models"], device=device)
    train = build_examples(tokenizer, pairs[~held_out], sft.instruction, sft.max_length, sft.keep_prompt)
    evaluation = build_examples(tokenizer, pairs[held_out], sft.instruction, sft.max_length, sft.keep_prompt)
    if sft.packing:
        train = pack_examples(train, sft.max_length)
    pad = tokenizer.pad_token_id

    def save_model(folder: Path, state_dict: dict | None) -> None:
        if state_dict is not None:  # ZeRO-3 gathers the weights of the engine's module: TargetTokenLoss's `model.`
            state_dict = {name.removeprefix("model."): tensor for name, tensor in state_dict.items()}
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    model.train()
    # The engine's forward is the loss itself: the LM head runs over the target positions in chunks, never the
    # (B, L, vocab) float32 logits that the model's own `.loss` makes.
    task = TrainTask(model=TargetTokenLoss(model), examples=train,
                     loss=lambda engine, batch: lm_loss(engine, batch, pad),
                     evaluate=lambda engine: {"loss/eval": eval_lm_loss(engine, evaluation, sft.batch_size, pad)},
                     save_model=save_model)
    train_on_worker(task, sft, Path(config["metrics_dir"]), "sft")


def run_sft(sft: SFTConfig, models: ModelsConfig, cluster: ClusterConfig, pairs_dir: Path, out_dir: Path,
            resume: bool = False) -> dict[str, Any]:
    """Train models.policy on the pairs on Ray Train and export the latest model to out_dir/model; returns the
    manifest."""
    from bp_ray.models.loading import resolve_model
    from bp_ray.train.loop import finish_stage, fit

    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUCCESS).unlink(missing_ok=True)
    if not resume:
        shutil.rmtree(out_dir / "metrics", ignore_errors=True)
    model = resolve_model(models.policy, models)
    from bp_ray.train.sft_data import split_held_out

    pairs = read_pairs_frame(pairs_dir)  # fail here, clearly, rather than inside every worker
    held_out = int(split_held_out(pairs[C.PAIR_ID].tolist(), sft.eval_fraction, sft.seed).sum())
    loop_config = {"sft": sft, "models": models, "pairs_dir": str(Path(pairs_dir).resolve()), "model": model,
                   "metrics_dir": str(out_dir / "metrics")}
    checkpoint, state, storage = fit(cluster, "sft", sft_worker_loop, loop_config, sft.resources, out_dir, resume)
    return finish_stage("sft", out_dir, checkpoint, state, {
        "base_model": models.policy, "pairs": len(pairs), "held_out_pairs": held_out,
        "workers": sft.resources.num_workers,
        "zero_stage": sft.deepspeed.zero_stage, "precision": sft.deepspeed.precision,
        "checkpoints": storage}, started)
