"""RL throughput on this machine: full iterations (rollout + reward + update) of `bp-ray train ppo` against TRL's
trainer of the same algorithm on the same tiny models, prompts and batch sizes: PPO against
`trl.experimental.ppo.PPOTrainer` (the installed TRL's own PPO), GRPO (`--algorithm grpo`, groups of 4) against
`trl.GRPOTrainer`.

Both start from the same SFT policy (trained here for one epoch on subject -> prompt pairs of the embedded
corpus) and get their reward from the same learned PickScore regressor (`bp-ray train rm`, labels made up so they
follow the number of tags and words): bp-ray through its reward actor, TRL by calling the regressor's backbone and
score head itself. Rollout batch 16, minibatch 8, 4 PPO epochs, 24 new tokens, sampling at temperature 1.

bp-ray runs on Ray Train + DeepSpeed (ZeRO stage 0: with one worker ZeRO partitions nothing and its gradient hooks
cost a quarter of a tiny model's update) with one CPU worker plus the reference and reward actors, and for GRPO
also with `ppo.async_rollout` (a rollout actor samples the next iteration one update behind). TRL runs in this
process after Ray is stopped. "Steady" is the median samples/s over the iterations after the first two; bp-ray's
median seconds in generation, reward (old and reference log-probs, the reward actor), waiting for the rollout and
the update come from its per-iteration metrics. TRL's figure moves by up to 20% between runs: --rounds repeats
the side-by-side runs and prints each round's ratios.

    python benchmarks/ppo_throughput.py [--iterations 12] [--algorithm grpo] [--rounds 3]

For GRPO both sample 16 responses an iteration (4 prompts x 4), take 8 optimizer steps on them (2 minibatches of 8,
4 passes; TRL: steps_per_generation 2, num_iterations 4), keep the KL to the reference in the loss (beta 0.05) and
score each completion with the same PickScore regressor (TRL through a reward function that calls it on the
completion, as bp-ray's reward actor does).
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

from bp_ray.config_loader import load_config
from bp_ray.data import columns as C
from bp_ray.data.policy_format import format_prompt
from bp_ray.data.subject_pairs import write_subject_pairs
from bp_ray.embedded.tiny_zoo import ensure_tiny_zoo
from bp_ray.rewards.labeler import RewardSetup
from bp_ray.train.ppo import run_ppo
from bp_ray.train.reward import run_rm
from bp_ray.train.sft import run_sft


def ppo_run(cfg, *args, **kwargs) -> dict:
    """run_ppo with this config's sections (the online reward renders and scores as the labels did)."""
    return run_ppo(cfg.ppo, cfg.sft, cfg.cluster, RewardSetup.for_labels(cfg.data, cfg.rewards, cfg.models),
                   cfg.data.scorer_pool, *args, **kwargs)

def sft_run(cfg, *args, **kwargs) -> dict:
    return run_sft(cfg.sft, cfg.models, cfg.cluster, *args, **kwargs)

def rm_run(cfg, *args, **kwargs) -> dict:
    return run_rm(cfg.rm, cfg.rewards, cfg.models, cfg.cluster, *args, **kwargs)

WARMUP = 2
PHASES = ("time/generate_s", "time/reward_s", "time/rollout_wait_s", "time/update_s")
"""Generation and reward (the rollout's own phases, on the actor with async_rollout), how long the worker waited
for the rollout, and the update."""
ROLLOUT, MINIBATCH, EPOCHS, NEW_TOKENS = 16, 8, 4, 24


def iteration_timer():
    """A TRL callback that stamps the end of every optimizer step."""
    from transformers import TrainerCallback

    class IterationTimer(TrainerCallback):
        def __init__(self):
            self.stamps = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    return IterationTimer()


def made_up_labels(pairs_dir: Path, folder: Path) -> Path:
    """Label files shaped like `bp-ray rewards label` output; scores grow with commas and words."""
    pairs = pd.read_parquet(pairs_dir / "part-00000.parquet")
    rows = pd.concat([pd.DataFrame({C.PAIR_ID: pairs[C.PAIR_ID], "role": role, C.PROMPT: pairs[column],
                                    "intent": pairs[C.LOW]}) for role, column in (("low", C.LOW), ("high", C.HIGH))],
                     ignore_index=True)
    rng = np.random.default_rng(0)
    rows["pickscore_mean"] = 19 + 0.4 * rows[C.PROMPT].str.count(",").clip(upper=6) + rng.normal(0, 0.1, len(rows))
    rows["aesthetic_mean"] = 4.5 + 0.05 * rows[C.PROMPT].str.split().str.len().clip(upper=30)
    folder.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(folder / "part-00000.parquet")
    return folder


def bp_ray_ppo(cfg, pairs: Path, sft: Path, rm: Path, out: Path) -> dict:
    start = time.perf_counter()
    manifest = ppo_run(cfg, pairs, sft, rm, out)
    wall = time.perf_counter() - start
    metrics = pd.read_csv(out / "metrics" / "metrics.csv").iloc[WARMUP:]
    return {"iterations": manifest["steps"], "steady_samples_per_s": float(metrics["perf/samples_per_s"].median()),
            "wall_s": wall, **{f"median_{k.split('/')[1]}": float(metrics[k].median()) for k in PHASES},
            "median_rollout_lag": float(metrics["rollout/lag"].median())}


def trl_ppo(cfg, pairs: Path, sft: Path, rm: Path, iterations: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(2)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(sft / "model", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(sft / "model")
    reference = AutoModelForCausalLM.from_pretrained(sft / "model")
    value = AutoModelForSequenceClassification.from_pretrained(sft / "model", num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(rm / "pickscore" / "model", num_labels=1)
    for model in (value, reward):
        model.config.pad_token_id = tokenizer.pad_token_id
    lows = pd.read_parquet(pairs / "part-00000.parquet")[C.LOW].tolist()
    queries = [format_prompt(cfg.sft.instruction, low) for low in lows]
    data = Dataset.from_dict({"input_ids": [tokenizer(q, add_special_tokens=False)["input_ids"] for q in queries]})
    # TRL's rollout batch is per_device_train_batch_size x accumulation x processes, split into num_mini_batches.
    args = PPOConfig(output_dir=str(out), per_device_train_batch_size=ROLLOUT, gradient_accumulation_steps=1,
                     num_mini_batches=ROLLOUT // MINIBATCH, num_ppo_epochs=EPOCHS, total_episodes=iterations * ROLLOUT,
                     response_length=NEW_TOKENS, temperature=1.0, learning_rate=cfg.ppo.lr,
                     kl_coef=cfg.ppo.init_kl_coef,
                     stop_token="eos", num_sample_generations=0, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=False, fp16=False, seed=cfg.ppo.seed, logging_steps=10_000, disable_tqdm=True,
                     local_rollout_forward_batch_size=ROLLOUT)
    timer = iteration_timer()
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, train_dataset=data, value_model=value, callbacks=[timer])
    timer.stamps = [time.perf_counter()]
    if (trainer.args.batch_size, trainer.args.mini_batch_size) != (ROLLOUT, MINIBATCH):
        raise RuntimeError(f"TRL batch {trainer.args.batch_size} / minibatch {trainer.args.mini_batch_size} differ "
                           f"from bp-ray's {ROLLOUT} / {MINIBATCH}: the comparison would be unfair")
    trainer.train()
    seconds = np.diff(timer.stamps)
    return {"iterations": len(seconds), "steady_samples_per_s": float(np.median(ROLLOUT / seconds[WARMUP:])),
            "wall_s": time.perf_counter() - start}


def trl_grpo(cfg, pairs: Path, sft: Path, rm: Path, iterations: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from bp_ray.models.reward_model import load_regressor, predict_standardised

    steps_per_round = (ROLLOUT // MINIBATCH) * EPOCHS

    torch.set_num_threads(2)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(sft / "model", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(sft / "model")
    regressor, reward_tokenizer = load_regressor(str(rm / "pickscore" / "model"), None, 1)

    def pickscore(prompts, completions, **kwargs) -> list[float]:
        return predict_standardised(regressor, reward_tokenizer, completions, cfg.rm.max_length)[:, 0].tolist()

    lows = pd.read_parquet(pairs / "part-00000.parquet")[C.LOW].tolist()
    data = Dataset.from_dict({"prompt": [format_prompt(cfg.sft.instruction, low) for low in lows]})
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=MINIBATCH, gradient_accumulation_steps=1,
                      steps_per_generation=ROLLOUT // MINIBATCH, num_generations=cfg.ppo.group_size,
                      num_iterations=EPOCHS, max_steps=iterations * steps_per_round,
                      max_completion_length=NEW_TOKENS, temperature=1.0, learning_rate=cfg.ppo.lr,
                      beta=cfg.ppo.init_kl_coef, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                      seed=cfg.ppo.seed, logging_steps=10_000, disable_tqdm=True)
    timer = iteration_timer()
    trainer = GRPOTrainer(model=policy, reward_funcs=[pickscore], args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[timer])
    timer.stamps = [time.perf_counter()]
    trainer.train()
    rounds = np.diff(timer.stamps[::steps_per_round])  # one generation round = steps_per_round optimizer steps
    return {"iterations": len(rounds), "steady_samples_per_s": float(np.median(ROLLOUT / rounds[WARMUP:])),
            "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--algorithm", choices=("ppo", "grpo"), default="ppo")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the side-by-side runs (TRL's figure is noisy)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bp-ray-ppo-bench-"))
    try:
        pairs = write_subject_pairs(work / "data", rows=1200)
        base = load_config("tiny")
        ensure_tiny_zoo(base.models)
        sft_run(load_config("tiny", ["sft.epochs=1", "sft.lr=3e-3", "sft.checkpoint_every=10000"]), pairs,
                work / "sft")
        rm_run(load_config("tiny", ["rm.epochs=1", "rm.checkpoint_every=10000"]),
               made_up_labels(pairs, work / "rewards"), work / "rm")
        overrides = [f"ppo.total_steps={args.iterations}", f"ppo.checkpoint_every={args.iterations}",
                     f"ppo.rollout_batch_size={ROLLOUT}", f"ppo.minibatch_size={MINIBATCH}", f"ppo.ppo_epochs={EPOCHS}",
                     f"ppo.max_new_tokens={NEW_TOKENS}", "ppo.reward_baseline=none", "ppo.eval_prompts=4",
                     f"ppo.algorithm={args.algorithm}", "ppo.group_size=4", "ppo.deepspeed.zero_stage=0"]
        rounds = [one_round(args, overrides, pairs, work / f"round-{i}") for i in range(args.rounds)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    trainer = "GRPOTrainer" if args.algorithm == "grpo" else "experimental PPOTrainer"
    labels = {"bp-ray": "bp-ray (Ray Train + DeepSpeed, actors)", "bp-ray async": "bp-ray, async_rollout",
              "TRL": f"TRL {trainer} (1 proc)"}
    print(f"{args.algorithm.upper()} throughput, tiny BLOOM, rollout {ROLLOUT}, minibatch {MINIBATCH}, "
          f"{EPOCHS} epochs, {NEW_TOKENS} new tokens, {args.iterations} iterations, {args.rounds} round(s)")
    for number, results in enumerate(rounds, 1):
        theirs = results["TRL"]["steady_samples_per_s"]
        print(f" round {number}")
        for name, got in results.items():
            print(f"  {labels[name]:40s} steady {got['steady_samples_per_s']:6.1f} samples/s  wall "
                  f"{got['wall_s']:6.1f} s  {got['steady_samples_per_s'] / theirs:.2f}x TRL")
            if name != "TRL":
                phases = ", ".join(f"{phase[5:-2]} {got['median_' + phase[5:]]:.3f}" for phase in PHASES)
                print(f"    median s per iteration: {phases}; rollout lag {got['median_rollout_lag']:.0f}")
    for name in rounds[0]:
        if name != "TRL":
            ratios = [r[name]["steady_samples_per_s"] / r["TRL"]["steady_samples_per_s"] for r in rounds]
            print(f"  {labels[name]} / TRL over the rounds: " + ", ".join(f"{x:.2f}x" for x in ratios)
                  + f"; median {np.median(ratios):.2f}x")
    print(json.dumps(rounds, indent=1))


def one_round(args: argparse.Namespace, overrides: list[str], pairs: Path, work: Path) -> dict:
    """bp-ray (and, for GRPO, bp-ray with async_rollout), then TRL with Ray stopped, from the same SFT policy and
    reward models."""
    import ray

    cfg = load_config("tiny", overrides)
    inputs = (pairs, work.parent / "sft", work.parent / "rm")
    results = {"bp-ray": bp_ray_ppo(cfg, *inputs, work / "ppo")}
    if args.algorithm == "grpo":
        results["bp-ray async"] = bp_ray_ppo(load_config("tiny", [*overrides, "ppo.async_rollout=true"]), *inputs,
                                             work / "ppo-async")
    ray.shutdown()  # the peer runs with the machine to itself
    peer = trl_grpo if args.algorithm == "grpo" else trl_ppo
    results["TRL"] = peer(cfg, *inputs, args.iterations, work / "trl")
    return results



if __name__ == "__main__":
    main()
