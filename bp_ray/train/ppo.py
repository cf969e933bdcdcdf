"""PPO (paper Section 4.3): the SFT policy learns to write prompts the reward prefers, with a per-token KL penalty
to the frozen SFT reference whose coefficient follows Ziegler et al.'s adaptive controller.

One iteration on every Ray Train worker: sample `rollout_batch_size / workers` responses to low prompts of the
training pairs, read their log-probs and values, ask the reference actor for its log-probs and the reward actor
for the scores, shape the scores with the guards and the baseline, turn them into per-token rewards (KL penalty
on every token, score on the last), GAE advantages and returns, then `ppo_epochs` passes of minibatch updates
of the policy (clipped surrogate, optional entropy bonus) and the critic (clipped value loss), each a DeepSpeed
engine. Every `checkpoint_every` iterations: greedy decoding of held-out low prompts is scored, and a checkpoint
(policy in Hugging Face format, critic, DeepSpeed states, the KL coefficient, RNG) is reported to Ray Train.
Iteration i samples with a generator seeded by (seed, i, rank), so a resumed run repeats the same iterations.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bp_ray.config import PipelineConfig
from bp_ray.data import columns as C
from bp_ray.layout import MANIFEST, SUCCESS
from bp_ray.train.loop import DS_DIR, DS_TAG, MODEL_DIR, RNG_DIR, STATE_FILE
from bp_ray.train.ppo_math import (
    entropy_from_logits,
    explained_variance,
    gae,
    kl_controller,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

CRITIC_DIR = "critic"
VALUE_HEAD_FILE = "value_head.safetensors"


class _ActorCritic:
    """The policy and the critic as DeepSpeed engines: two (value_model=separate) or one shared."""

    def __init__(self, cfg: PipelineConfig, sft_model: str, device: str, world: int):
        import deepspeed
        from transformers import AutoModelForTokenClassification

        from bp_ray.models.loading import load_causal_lm
        from bp_ray.train.deepspeed_config import deepspeed_config
        from bp_ray.train.ppo_rollout import SharedValueModel

        ppo = cfg.ppo
        self.shared = ppo.value_model == "shared"
        policy, self.tokenizer = load_causal_lm(sft_model, cfg.models, device=device)
        # Dropout off in every pass: old and new log-probs must come from the same function.
        policy.eval()
        updates = ppo.total_steps * ppo.ppo_epochs * (ppo.rollout_batch_size // ppo.minibatch_size)
        ds_config = deepspeed_config(ppo.deepspeed, ppo.minibatch_size, world, ppo.lr, 0.0, 0, updates, "constant",
                                     on_cpu=str(device) == "cpu")
        if self.shared:
            module = SharedValueModel(policy).to(device)
            self.policy_engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                                          config=ds_config)
            self.critic_engine = None
            return
        critic = AutoModelForTokenClassification.from_pretrained(sft_model, num_labels=1).to(device).eval()
        if critic.config.pad_token_id is None:
            critic.config.pad_token_id = self.tokenizer.pad_token_id
        self.policy_engine, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(),
                                                      config=ds_config)
        self.critic_engine, *_ = deepspeed.initialize(model=critic, model_parameters=critic.parameters(),
                                                      config=dict(ds_config))

    @property
    def policy(self) -> Any:
        module = self.policy_engine.module
        return module.policy if self.shared else module

    def logits_and_values(self, rollout: Any) -> tuple[Any, Any]:
        """(B, R, vocab) logits and (B, R) values of the response tokens, with grad."""
        from bp_ray.train.ppo_rollout import response_logits, response_values

        if self.shared:
            logits, values = self.policy_engine(rollout.input_ids, rollout.attention_mask)
            start = rollout.query_len - 1
            return logits[:, start:-1].float(), values[:, start:-1]
        return response_logits(self.policy_engine, rollout), response_values(self.critic_engine, rollout)

    def step(self, policy_loss: Any, value_loss: Any, vf_coef: float) -> None:
        if self.shared:
            self.policy_engine.backward(policy_loss + vf_coef * value_loss)
            self.policy_engine.step()
            return
        self.policy_engine.backward(policy_loss)
        self.policy_engine.step()
        self.critic_engine.backward(value_loss)
        self.critic_engine.step()

    def engines(self) -> dict[str, Any]:
        return {"policy": self.policy_engine, **({"critic": self.critic_engine} if self.critic_engine else {})}

    def save_models(self, folder: Path) -> None:
        """Policy in Hugging Face format (what `serve` and `eval` load), and the critic beside it."""
        from safetensors.torch import save_file

        self.policy.save_pretrained(folder / MODEL_DIR, safe_serialization=True)
        self.tokenizer.save_pretrained(folder / MODEL_DIR)
        if self.shared:
            head = self.policy_engine.module.value_head.state_dict()
            save_file({k: v.contiguous() for k, v in head.items()}, str(folder / MODEL_DIR / VALUE_HEAD_FILE))
        else:
            self.critic_engine.module.save_pretrained(folder / CRITIC_DIR, safe_serialization=True)


def _all_mean(values: dict[str, float], world: int) -> dict[str, float]:
    """Mean of each metric over the workers (so the KL controller and the logs agree on every rank)."""
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(keys, (tensor / world).tolist(), strict=True))


def ppo_worker_loop(config: dict) -> None:
    """Ray Train worker: PPO iterations from the latest checkpoint (if any) to ppo.total_steps."""
    from bp_ray.train.loop import finish_logs, log_step, progress_bar, report_checkpoint, worker_device

    cfg: PipelineConfig = config["cfg"]
    ppo = cfg.ppo
    worker_device(ppo.resources)
    import ray.train
    import torch

    from bp_ray.train.metrics import MetricsWriter
    from bp_ray.train.ppo_actors import remote_scores
    from bp_ray.train.ppo_rollout import Guards, response_logprobs, response_values, sample
    from bp_ray.train.sft import read_pairs_frame
    from bp_ray.train.sft_data import batches_for_rank, epoch_order, format_prompt, policy_text, split_held_out

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = "cuda" if ppo.resources.use_gpu else "cpu"
    if ppo.resources.use_gpu:
        import ray.train.torch as rtt

        device = str(rtt.get_device())
    torch.manual_seed(ppo.seed)  # the critic's new value head: the same start on every rank and every run
    model = _ActorCritic(cfg, config["sft_model"], device, world)
    tokenizer = model.tokenizer
    reference, reward_actor = config["reference"], config["reward"]
    pairs = read_pairs_frame(Path(config["pairs_dir"]))
    held_out = split_held_out(pairs[C.PAIR_ID].tolist(), cfg.sft.eval_fraction, cfg.sft.seed)
    train, evaluation = pairs[~held_out].reset_index(drop=True), pairs[held_out].head(ppo.eval_prompts)
    if len(train) < ppo.rollout_batch_size:
        raise ValueError(f"{len(train)} training pairs are fewer than ppo.rollout_batch_size={ppo.rollout_batch_size}")
    keep = cfg.sft.keep_prompt  # the policy writes only what follows the user prompt; rewards judge the whole
    guards = Guards(ppo.relevance_coef, ppo.max_words, ppo.length_coef, ppo.repetition_coef,
                    ppo.intent_hinge_coef, ppo.intent_margin)
    controller = kl_controller(ppo.init_kl_coef, ppo.kl_target, ppo.kl_horizon)

    def scores_of(lows: list[str], texts: list[str]) -> dict[str, np.ndarray]:
        return remote_scores(reward_actor, lows, texts)

    def baseline_of(rows: Any) -> np.ndarray:
        """Reward of each pair's own high prompt (the paper's reference output).

        Scored with the iteration's whole batch every time rather than cached per pair: padding makes a score
        depend on its batch in the last float bits, and a resumed run must repeat the same numbers. Cheap: the
        learned reward is one forward pass, and the online reward answers repeats from its cache."""
        if ppo.reward_baseline == "none":
            return np.zeros(len(rows))
        return np.asarray(scores_of(rows[C.LOW].tolist(), rows[C.HIGH].tolist())["reward"], dtype=np.float64)

    def intent_of(lows: list[str]) -> np.ndarray | None:
        """Relevance of each low prompt to itself: through its own renders (online, cached after the first time),
        or 1 for the text reward (a prompt's CLIP text embedding against itself)."""
        if not ppo.intent_hinge_coef:
            return None
        if ppo.reward_source == "rm":
            return np.ones(len(lows))
        return np.asarray(scores_of(lows, lows)["relevance"], dtype=np.float64)

    def evaluate() -> dict[str, float]:
        lows = evaluation[C.LOW].tolist()
        mine = lows[rank::world]
        out = sample(model.policy, tokenizer, [format_prompt(cfg.sft.instruction, low, keep) for low in mine],
                     ppo.max_new_tokens, greedy=True, max_query_tokens=ppo.max_query_tokens)
        texts = [policy_text(low, text, keep) for low, text in zip(mine, out.texts, strict=True)]
        got = scores_of(mine, texts)
        words = [len(t.split()) for t in texts]
        local = {"eval/reward": float(np.mean(got["reward"])), "eval/words": float(np.mean(words))}
        return _all_mean(local, world)

    state: dict[str, Any] = {"step": 0, "metrics": {}, "starts": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            for name, engine in model.engines().items():
                engine.load_checkpoint(str(Path(folder) / DS_DIR / name), tag=DS_TAG)
            state = json.loads((Path(folder) / STATE_FILE).read_text())
            controller.load_state_dict(state["kl_controller"])
    else:
        state["initial_eval"] = evaluate()  # the SFT policy's held-out reward, for comparison
    state["starts"] = [*state.get("starts", []), state["step"]]
    start_step = state["step"]
    end_step = min(ppo.total_steps, ppo.stop_after_step) if ppo.stop_after_step else ppo.total_steps
    writer = MetricsWriter(Path(config["metrics_dir"]), enabled=rank == 0, start_step=start_step)
    progress = progress_bar("ppo", ppo.total_steps, start_step) if rank == 0 else None
    per_epoch = len(train) // ppo.rollout_batch_size

    for step in range(start_step, end_step):
        began = time.perf_counter()
        epoch, index = divmod(step, per_epoch)
        rows = train.iloc[batches_for_rank(epoch_order(len(train), epoch, ppo.seed), ppo.rollout_batch_size,
                                           rank, world)[index]]
        lows = rows[C.LOW].tolist()
        torch.manual_seed(hash((ppo.seed, step, rank)) % 2**31)
        rollout = sample(model.policy, tokenizer, [format_prompt(cfg.sft.instruction, low, keep) for low in lows],
                         ppo.max_new_tokens, ppo.temperature, ppo.top_p, max_query_tokens=ppo.max_query_tokens)
        rollout.texts = [policy_text(low, text, keep) for low, text in zip(lows, rollout.texts, strict=True)]
        generated = time.perf_counter()
        ref_future = reference.logprobs.remote(rollout.input_ids.cpu().numpy(),
                                               rollout.attention_mask.cpu().numpy(), rollout.query_len)
        with torch.no_grad():
            if model.shared:
                old_logits, old_values = model.logits_and_values(rollout)
                old_logprobs = logprobs_from_logits(old_logits, rollout.response_ids)
            else:
                old_logprobs = response_logprobs(model.policy_engine.module, rollout)
                old_values = response_values(model.critic_engine.module, rollout)
        scores = scores_of(lows, rollout.texts)
        ref_logprobs = torch.as_tensor(ray.get(ref_future), device=old_logprobs.device)
        shaped, reward_terms = guards.shape(scores["reward"], baseline_of(rows), scores["relevance"], rollout.texts,
                                            intent_of(lows))
        rewarded = time.perf_counter()

        mask = rollout.mask.to(old_logprobs.device)
        rewards, kl = token_rewards(torch.as_tensor(shaped, dtype=torch.float32, device=mask.device), old_logprobs,
                                    ref_logprobs, mask, controller.value, ppo.kl_estimator)
        advantages, returns = gae(old_values, rewards, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        stats: dict[str, list[float]] = {"loss/policy": [], "loss/value": [], "clipfrac": [], "approx_kl": [],
                                         "value_clipfrac": [], "entropy": []}
        share = ppo.minibatch_size // world
        for _ in range(ppo.ppo_epochs):
            for rows_idx in torch.randperm(len(lows)).split(share):
                part = rollout.select(rows_idx)
                part_mask = mask[rows_idx]
                logits, values = model.logits_and_values(part)
                logprobs = logprobs_from_logits(logits, part.response_ids)
                pg, pg_stats = policy_loss(logprobs, old_logprobs[rows_idx], advantages[rows_idx], part_mask,
                                           ppo.clip_range)
                vf, vf_stats = value_loss(values, old_values[rows_idx], returns[rows_idx], part_mask,
                                          ppo.clip_range_value)
                entropy = masked_mean(entropy_from_logits(logits), part_mask)
                model.step(pg - ppo.entropy_coef * entropy, vf, ppo.vf_coef)
                for key, value in {"loss/policy": float(pg), "loss/value": float(vf), "entropy": float(entropy),
                                   **pg_stats, **vf_stats}.items():
                    stats[key].append(float(value))
        updated = time.perf_counter()

        sequence_kl = float((kl * mask).sum(-1).mean())
        local = {**reward_terms, **{k: float(np.mean(v)) for k, v in stats.items()},
                 "reward/pickscore": float(np.mean(scores["pickscore"])),
                 "reward/aesthetic": float(np.mean(scores["aesthetic"])),
                 "kl": sequence_kl, "response_tokens": float(mask.sum(-1).mean()),
                 "explained_variance": explained_variance(old_values, returns, mask),
                 "time/generate_s": generated - began, "time/reward_s": rewarded - generated,
                 "time/update_s": updated - rewarded}
        metrics = _all_mean(local, world)
        metrics["kl_coef"] = controller.value
        controller.update(metrics["kl"], ppo.rollout_batch_size)
        metrics["perf/samples_per_s"] = ppo.rollout_batch_size / (time.perf_counter() - began)
        done = step + 1
        if done % ppo.checkpoint_every == 0 or done == end_step:
            metrics.update(evaluate())
            state.update(step=done, metrics=metrics, total_steps=ppo.total_steps,
                         kl_controller=controller.state_dict())
            report_checkpoint(_save_checkpoint(model, state, rank), metrics, done)
        log_step(writer, progress, done, metrics, f"ppo reward {metrics['reward/combined']:.3f} kl {metrics['kl']:.2f}")
    finish_logs(writer, progress)


def _save_checkpoint(model: _ActorCritic, state: dict[str, Any], rank: int) -> Path:
    import torch

    folder = Path(tempfile.mkdtemp(prefix="bp-ray-ppo-ckpt-"))
    for name, engine in model.engines().items():
        engine.save_checkpoint(str(folder / DS_DIR / name), tag=DS_TAG)  # collective
    (folder / RNG_DIR).mkdir()
    torch.save(torch.get_rng_state(), folder / RNG_DIR / f"rank-{rank}.pt")
    if rank == 0:
        model.save_models(folder)
        (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


def run_ppo(cfg: PipelineConfig, pairs_dir: Path, sft_dir: Path, rm_dir: Path | None, out_dir: Path,
            resume: bool = False, cache_path: Path | None = None) -> dict[str, Any]:
    """PPO on Ray Train with the reference and reward actors; exports the policy to out_dir/model."""
    import ray

    from bp_ray.ray_runtime import init_ray, require_resources
    from bp_ray.train.loop import finish_stage, fit
    from bp_ray.train.ppo_actors import start_reference_actor, start_reward_actor
    from bp_ray.train.sft import read_pairs_frame

    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    sft_model = Path(sft_dir).resolve() / MODEL_DIR
    if not (sft_model / "config.json").exists():
        raise FileNotFoundError(f"no SFT model at {sft_model}: run `bp-ray train sft` first (or pass --sft)")
    read_pairs_frame(pairs_dir)  # fail here, clearly, rather than inside every worker or actor
    if cfg.ppo.reward_source == "rm":
        if rm_dir is None:
            raise ValueError("ppo.reward_source=rm needs the reward models (--rm DIR), or set ppo.reward_source=online")
        if not (Path(rm_dir) / MANIFEST).exists():
            raise FileNotFoundError(f"no reward models at {rm_dir}: run `bp-ray train rm` first (or pass --rm)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUCCESS).unlink(missing_ok=True)
    if not resume:
        shutil.rmtree(out_dir / "metrics", ignore_errors=True)
    init_ray(cfg.cluster)
    workers = cfg.ppo.resources
    require_resources(cfg.cluster, workers.num_workers * workers.cpus_per_worker + 2 * cfg.ppo.actor_cpus,
                      (workers.num_workers if workers.use_gpu else 0) + 2 * cfg.ppo.actor_gpus,
                      "ppo (train workers + reference and reward actors)")
    reference = start_reference_actor(cfg, sft_model)
    reward = start_reward_actor(cfg, Path(rm_dir).resolve() if rm_dir else None, cache_path)
    try:
        loop_config = {"cfg": cfg, "pairs_dir": str(Path(pairs_dir).resolve()), "sft_model": str(sft_model),
                       "metrics_dir": str(out_dir / "metrics"), "reference": reference, "reward": reward}
        checkpoint, state, storage = fit(cfg, "ppo", ppo_worker_loop, loop_config, cfg.ppo.resources, out_dir,
                                         resume)
        critic = checkpoint / CRITIC_DIR
        if critic.exists():
            shutil.rmtree(out_dir / CRITIC_DIR, ignore_errors=True)
            shutil.copytree(critic, out_dir / CRITIC_DIR)
        return finish_stage("ppo", out_dir, checkpoint, state, {
            "initial_eval": state.get("initial_eval", {}), "sft_model": str(sft_model),
            "reward_source": cfg.ppo.reward_source, "rm": str(rm_dir) if rm_dir else None,
            "workers": cfg.ppo.resources.num_workers, "kl_coef": state["kl_controller"]["value"],
            "checkpoints": storage, "config_hash": cfg.hash("ppo", "models", "rewards")}, started)
    finally:
        for actor in (reference, reward):
            ray.kill(actor)
