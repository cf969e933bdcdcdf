"""SFT throughput on this machine: the same tiny BLOOM, the same pairs, the same global batch, three ways:

1. `bp-ray train sft` on Ray Train + DeepSpeed with 2 workers (gloo, ZeRO-2, fp32), one CPU each;
2. a plain single-process loop: torch AdamW over the same collated batches;
3. TRL's `SFTTrainer` (prompt-completion data, loss on the completion only), single process.

Tokens/s counts non-padding tokens of the training sequences. "Steady" is the median over the steps after the
first few (start-up, allocator warm-up); "end to end" divides all tokens by the wall time of the whole call,
including model loading and, for Ray Train, starting the workers. Ratios are against the plain loop.

    python benchmarks/train_throughput.py [--steps 60] [--batch-size 8] [--rows 1200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bp_ray.config_loader import load_config
from bp_ray.data import columns as C
from bp_ray.data.policy_format import format_prompt
from bp_ray.data.subject_pairs import write_subject_pairs
from bp_ray.embedded.tiny_zoo import ensure_tiny_zoo
from bp_ray.models.loading import load_causal_lm
from bp_ray.train.sft import run_sft
from bp_ray.train.sft_data import build_examples, collate, epoch_order

WARMUP_STEPS = 5


def ray_train(cfg, pairs_dir: Path, work: Path) -> dict:
    start = time.perf_counter()
    manifest = run_sft(cfg.sft, cfg.models, cfg.cluster, pairs_dir, work / "ray")
    wall = time.perf_counter() - start
    metrics = pd.read_csv(work / "ray" / "metrics" / "metrics.csv")
    rates = metrics["perf/tokens_per_s"].to_numpy()
    return {"steps": manifest["steps"], "steady_tokens_per_s": float(np.median(rates[WARMUP_STEPS:])),
            "wall_s": wall}


def plain_loop(cfg, examples: list, steps: int) -> dict:
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(cfg.models.policy, cfg.models, device="cpu")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft.lr)
    order = epoch_order(len(examples), 0, cfg.sft.seed)
    rates, tokens_total = [], 0
    for step in range(steps):
        began = time.perf_counter()
        batch = collate([examples[i] for i in order[step * cfg.sft.batch_size:(step + 1) * cfg.sft.batch_size]],
                        tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.sft.deepspeed.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = int(batch["attention_mask"].sum())
        tokens_total += tokens
        rates.append(tokens / (time.perf_counter() - began))
    return {"steps": steps, "steady_tokens_per_s": float(np.median(rates[WARMUP_STEPS:])),
            "wall_s": time.perf_counter() - start, "tokens": tokens_total}


def trl_trainer(cfg, pairs: pd.DataFrame, steps: int, work: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.began, self.seconds = 0.0, []

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.began)

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(cfg.models.policy, cfg.models, device="cpu")
    tokenizer.padding_side = "right"
    data = Dataset.from_dict({"prompt": [format_prompt(cfg.sft.instruction, low) for low in pairs[C.LOW]],
                              "completion": pairs[C.HIGH].tolist()})
    args = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=cfg.sft.batch_size, max_steps=steps,
                     learning_rate=cfg.sft.lr, max_length=cfg.sft.max_length, completion_only_loss=True,
                     logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, seed=cfg.sft.seed,
                     dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False)
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[timer])
    # The tokens TRL trains on: its own tokenised dataset (prompt + completion + EOS), in its sampler's order.
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    trainer.train()
    wall = time.perf_counter() - start
    mean_tokens = float(np.mean(lengths)) * cfg.sft.batch_size
    steady = float(np.median(timer.seconds[WARMUP_STEPS:]))
    return {"steps": len(timer.seconds), "steady_tokens_per_s": mean_tokens / steady, "wall_s": wall,
            "mean_sequence_tokens": float(np.mean(lengths))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=1200, help="corpus prompts the pairs come from")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bp-ray-train-bench-"))
    try:
        pairs_dir = write_subject_pairs(work / "pairs", rows=args.rows)
        pairs = pd.read_parquet(pairs_dir / "part-00000.parquet")
        probe = load_config("tiny", [f"sft.batch_size={args.batch_size}", "sft.eval_fraction=0", *args.overrides])
        ensure_tiny_zoo(probe.models)
        _, tokenizer = load_causal_lm(probe.models.policy, probe.models, device="cpu")
        examples = build_examples(tokenizer, pairs, probe.sft.instruction, probe.sft.max_length)
        epochs = args.steps / (len(examples) // args.batch_size)
        cfg = load_config("tiny", [f"sft.batch_size={args.batch_size}", "sft.eval_fraction=0",
                                   f"sft.epochs={epochs}", f"sft.checkpoint_every={args.steps}",
                                   "sft.resources.num_workers=2", *args.overrides])
        if args.steps > len(examples) // args.batch_size:
            raise SystemExit(f"--steps {args.steps} exceeds one epoch ({len(examples) // args.batch_size} batches)")
        results = {"ray_train_deepspeed_2_workers": ray_train(cfg, pairs_dir, work),
                   "plain_loop_1_process": plain_loop(cfg, examples, args.steps),
                   "trl_sft_trainer_1_process": trl_trainer(cfg, pairs, args.steps, work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results["plain_loop_1_process"]
    plain_end_to_end = base["tokens"] / base["wall_s"]
    print(f"SFT throughput, tiny BLOOM, global batch {args.batch_size}, {args.steps} steps, "
          f"{torch.get_num_threads()} torch threads in the driver")
    for name, result in results.items():
        ratio = result["steady_tokens_per_s"] / base["steady_tokens_per_s"]
        print(f"  {name:32s} steady {result['steady_tokens_per_s']:9.0f} tokens/s ({ratio:.2f}x plain)   "
              f"wall {result['wall_s']:6.1f} s")
    print(f"  plain loop end to end: {plain_end_to_end:.0f} tokens/s")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
