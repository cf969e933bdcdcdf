"""PPO (paper Section 4.3): the SFT policy learns to write prompts the reward prefers, with a per-token KL penalty
to the frozen SFT reference whose coefficient follows Ziegler et al.'s adaptive controller.

One iteration on every Ray Train worker: sample `rollout_batch_size / workers` responses to low prompts of the
training pairs, read their log-probs and values, ask its group's reference actor for its log-probs and reward
actor for the scores, shape the scores with the guards and the baseline, turn them into per-token rewards (KL penalty
on every token, score on the last), GAE advantages and returns, then `ppo_epochs` passes of minibatch updates
on one total loss (clipped surrogate, optional entropy bonus, clipped value loss) of the policy and the critic,
one module in one DeepSpeed engine. Every `checkpoint_every` iterations: greedy decoding of held-out low prompts
is scored, and a checkpoint (policy in Hugging Face format, critic, DeepSpeed state, the KL coefficient, RNG) is
reported to Ray Train.
Iteration i samples with a generator seeded by (seed, i, rank), so a resumed run repeats the same iterations.
With ppo.async_rollout (group methods) a rollout actor per worker samples iteration i+1 while the worker updates
on iteration i, with the weights of before that update (one update off-policy).

The loop reads as the algorithm: `rollout()` (ppo_experience.py: samples, old log-probs and values, reference
log-probs, shaped scores), `advantages()` (token rewards with the KL penalty, GAE, whitening), `update()` (the
clipped policy and value losses over minibatches, summed in one line); the math is in `ppo_math.py`, one function
per equation.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bp_ray.config import ActorPoolConfig, ClusterConfig, ModelsConfig, PPOConfig, SFTConfig
from bp_ray.data import columns as C
from bp_ray.layout import MANIFEST, SUCCESS
from bp_ray.rewards.labeler import RewardSetup
from bp_ray.train.group_math import (
    grpo_advantages,
    kl_loss,
    normalised_score,
    rloo_advantages,
    token_advantages,
)
from bp_ray.train.loop import (
    MODEL_DIR,
    finish_logs,
    log_step,
    progress_bar,
    report_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    worker_device,
)
from bp_ray.train.ppo_actors import actor_group, actor_groups
from bp_ray.train.ppo_experience import Experience, Scorer, guards_for, rollout
from bp_ray.train.ppo_math import (
    explained_variance,
    gae,
    kl_controller,
    kl_per_token,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

CRITIC_DIR = "critic"
VALUE_HEAD_FILE = "value_head.safetensors"


class _ActorCritic:
    """The policy and the critic as one module in one DeepSpeed engine (one optimizer, one step), as CleanRL's
    agent: the critic is the policy's backbone with a value head (value_model=shared) or a copy of the SFT model
    with its own token-regression head (value_model=separate)."""

    def __init__(self, ppo: PPOConfig, models: ModelsConfig, sft_model: str, device: str, world: int):
        import deepspeed
        from transformers import AutoModelForTokenClassification

        from bp_ray.models.loading import load_causal_lm, use_torch_gelu
        from bp_ray.train.deepspeed_config import deepspeed_config
        from bp_ray.train.ppo_rollout import PolicyModel, SeparateValueModel, SharedValueModel

        self.device = device
        self.critic = "none" if ppo.algorithm != "ppo" else ppo.value_model
        policy, self.tokenizer = load_causal_lm(sft_model, models, device=device)
        # Dropout off in every pass: old and new log-probs must come from the same function.
        policy.eval()
        if self.critic == "none":
            module = PolicyModel(policy)
        elif self.critic == "shared":
            module = SharedValueModel(policy)
        else:
            critic = AutoModelForTokenClassification.from_pretrained(sft_model, num_labels=1).eval()
            use_torch_gelu(critic)
            if critic.config.pad_token_id is None:
                critic.config.pad_token_id = self.tokenizer.pad_token_id
            module = SeparateValueModel(policy, critic)
        module = module.to(device)
        updates = ppo.total_steps * ppo.ppo_epochs * (ppo.rollout_batch_size // ppo.minibatch_size)
        ds_config = deepspeed_config(ppo.deepspeed, ppo.minibatch_size, world, ppo.lr, 0.0, 0, updates, "constant",
                                     on_cpu=str(device) == "cpu")
        self.engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=ds_config)

    @property
    def policy(self) -> Any:
        return self.engine.module.policy

    def response_outputs(self, rollout: Any, with_entropy: bool = False) -> tuple[Any, Any, Any]:
        """(B, R) log-probs of the response tokens, their entropies (None unless with_entropy) and values (None
        without a critic), with grad; the LM head runs in chunks (token_logprobs), never on all R columns at once."""
        logprobs, entropy, values = self.engine(rollout.input_ids, rollout.attention_mask, rollout.response_ids,
                                                with_entropy)
        return logprobs, entropy, None if values is None else values.float()

    def logprobs_and_values(self, rollout: Any) -> tuple[Any, Any]:
        """(B, R) log-probs and values of the sampled response tokens, without grad (the "old" ones of PPO)."""
        import torch

        with torch.no_grad():
            logprobs, _, values = self.response_outputs(rollout)
            return logprobs, values

    def step(self, loss: Any) -> None:
        """One optimizer step on the total loss, policy and critic together."""
        self.engine.backward(loss)
        self.engine.step()

    def save_models(self, folder: Path, weights: dict | None = None) -> None:
        """Policy in Hugging Face format (what `serve` and `eval` load), and the critic beside it."""
        from safetensors.torch import save_file

        self.policy.save_pretrained(folder / MODEL_DIR, safe_serialization=True)
        self.tokenizer.save_pretrained(folder / MODEL_DIR)
        if self.critic == "shared":
            head = self.engine.module.value_head.state_dict()
            save_file({k: v.contiguous() for k, v in head.items()}, str(folder / MODEL_DIR / VALUE_HEAD_FILE))
        elif self.critic == "separate":
            self.engine.module.critic.save_pretrained(folder / CRITIC_DIR, safe_serialization=True)


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


def advantages(exp: Experience, kl_coef: float, ppo: Any) -> tuple[Any, Any, Any]:
    """(B, T) advantages, (B, T) returns (None without a critic) and the (B, T) per-token KL to the reference.

    PPO: the KL penalty on every token and the score on the last (token_rewards), GAE over them, whitened. GRPO /
    RLOO: each response's score (per-term group-standardised with normalize_terms; less kl_coef x its summed KL
    for RLOO with kl_in=reward) made group-relative, the same on every token of the response."""
    import torch

    mask = exp.rollout.mask.to(exp.old_logprobs.device)
    scores = torch.as_tensor(exp.shaped, dtype=torch.float32, device=mask.device)
    if ppo.algorithm == "ppo":
        rewards, kl = token_rewards(scores, exp.old_logprobs, exp.ref_logprobs, mask, kl_coef, ppo.kl_estimator)
        adv, returns = gae(exp.old_values, rewards, mask, ppo.gamma, ppo.lam)
        return (masked_whiten(adv, mask) if ppo.whiten_advantages else adv), returns, kl
    kl = kl_per_token(exp.old_logprobs, exp.ref_logprobs, ppo.kl_estimator)
    if ppo.normalize_terms:
        terms = {name: torch.as_tensor(values, dtype=torch.float32, device=mask.device)
                 for name, values in exp.terms.items()}
        scores = normalised_score(terms, exp.weights, ppo.group_size, ppo.group_eps)
    if ppo.algorithm == "rloo" and ppo.kl_in == "reward":
        scores = scores - kl_coef * (kl * mask).sum(dim=-1)
    adv = (grpo_advantages(scores, ppo.group_size, ppo.group_eps) if ppo.algorithm == "grpo"
           else rloo_advantages(scores, ppo.group_size))
    return token_advantages(adv, mask), None, kl


def kl_in_loss(ppo: Any) -> bool:
    """Whether the KL to the reference is a loss term (GRPO; RLOO with kl_in=loss) rather than in the reward."""
    return ppo.algorithm == "grpo" or (ppo.algorithm == "rloo" and ppo.kl_in == "loss")


def update(model: _ActorCritic, exp: Experience, adv: Any, returns: Any, ppo: Any, world: int,
           kl_coef: float) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout in minibatches, each one optimizer step on the total loss: the clipped
    surrogate, minus the entropy bonus, plus the clipped value loss (PPO's critic) or the k3 KL term (GRPO, RLOO
    with kl_in=loss); returns each loss and statistic averaged over the steps."""
    import torch

    mask = exp.rollout.mask.to(exp.old_logprobs.device)
    zero = torch.zeros((), device=mask.device)
    stats: dict[str, list[float]] = defaultdict(list)
    for _ in range(ppo.ppo_epochs):
        for rows in torch.randperm(len(exp.rollout.texts)).split(ppo.minibatch_size // world):
            part = exp.rollout.select(rows).trimmed()
            n = part.mask.shape[1]  # the response columns these rows use
            m = mask[rows, :n]
            logprobs, token_entropy, values = model.response_outputs(part, with_entropy=True)
            pg, pg_stats = policy_loss(logprobs, exp.old_logprobs[rows, :n], adv[rows, :n], m, ppo.clip_range)
            vf, vf_stats = (value_loss(values, exp.old_values[rows, :n], returns[rows, :n], m, ppo.clip_range_value)
                            if values is not None else (zero, {}))
            kl = kl_loss(logprobs, exp.ref_logprobs[rows, :n], m) if kl_in_loss(ppo) else zero
            # Without a bonus the entropy is only logged: no gradient to walk back through.
            entropy = masked_mean(token_entropy if ppo.entropy_coef else token_entropy.detach(), m)
            loss = pg - ppo.entropy_coef * entropy + ppo.vf_coef * vf + kl_coef * kl
            model.step(loss)
            losses = {"loss/policy": pg, "entropy": entropy, **pg_stats,
                      **({"loss/value": vf, **vf_stats} if values is not None else {}),
                      **({"loss/kl": kl} if kl_in_loss(ppo) else {})}
            for key, value in losses.items():
                stats[key].append(float(value.detach() if isinstance(value, torch.Tensor) else value))
    return {k: float(np.mean(v)) for k, v in stats.items()}


def evaluate(model: _ActorCritic, ppo: PPOConfig, sft: SFTConfig, lows: list[str], scorer: Scorer,
             world: int) -> dict:
    """Greedy rewrites of this rank's share of the held-out low prompts, scored; averaged over the ranks."""
    from bp_ray.data.policy_format import encode_prompts, policy_text
    from bp_ray.train.ppo_rollout import sample

    keep = sft.keep_prompt
    out = sample(model.policy, model.tokenizer, encode_prompts(model.tokenizer, sft.instruction, lows, keep),
                 ppo.max_new_tokens, greedy=True, max_query_tokens=ppo.max_query_tokens)
    texts = [policy_text(low, text, keep) for low, text in zip(lows, out.texts, strict=True)]
    got = scorer.scores(lows, texts)
    return _all_mean({"eval/reward": float(np.mean(got["reward"])),
                      "eval/words": float(np.mean([len(t.split()) for t in texts]))}, world)


class _Rollouts:
    """Where each iteration's experience comes from: the worker's own policy (on-policy), or with
    ppo.async_rollout a rollout actor that samples iteration i+1 with the weights of before update i while the
    worker runs that update."""

    def __init__(self, model: _ActorCritic, ppo: PPOConfig, sft: SFTConfig, scorer: Scorer, reference: Any,
                 config: dict, batch_rows: Any, rank: int, end_step: int):
        from bp_ray.train.ppo_actors import start_rollout_actor

        # The reference and reward actors of this worker's group; its rollout actor asks the same ones.
        self.model, self.ppo, self.sft, self.scorer, self.reference = model, ppo, sft, scorer, reference
        self.batch_rows, self.rank, self.end_step = batch_rows, rank, end_step
        self.actor = (start_rollout_actor(ppo, sft, config["models"], config["sft_model"], self.reference,
                                          scorer.actor) if ppo.async_rollout else None)
        self.pending: tuple[int, Any] | None = None

    def seed(self, step: int) -> int:
        return hash((self.ppo.seed, step, self.rank)) % 2**31

    def get(self, step: int) -> Experience:
        """This step's experience; with the actor, also asks for the next step's, sampled with the weights the
        policy has now (before this step's update)."""
        import ray
        import torch

        if self.actor is None:
            torch.manual_seed(self.seed(step))
            return rollout(self.model, self.reference, self.ppo, self.sft, self.batch_rows(step), self.scorer, step)
        pending = self.pending[1] if self.pending and self.pending[0] == step else self._ask(step, step)
        self.pending = (step + 1, self._ask(step + 1, step)) if step + 1 < self.end_step else None
        return ray.get(pending).to(self.model.device)

    def _ask(self, step: int, policy_step: int) -> Any:
        weights = {name: tensor.detach().cpu() for name, tensor in self.model.policy.state_dict().items()}
        return self.actor.rollout.remote(weights, policy_step, self.batch_rows(step), self.seed(step))


def with_room(pairs: Any, scorer: Any, ceiling: float | None) -> Any:
    """The pairs whose user prompt, scored as its own rewrite, is below `ceiling` (all of them for None)."""
    if ceiling is None or pairs.empty:
        return pairs
    lows = pairs[C.LOW].tolist()
    own = np.asarray(scorer.scores(lows, lows)["reward"], dtype=np.float64)
    return pairs[own < ceiling].reset_index(drop=True)


def ppo_worker_loop(config: dict) -> None:
    """Ray Train worker: RL iterations (ppo.algorithm) from the latest checkpoint (if any) to ppo.total_steps."""

    ppo: PPOConfig = config["ppo"]
    sft: SFTConfig = config["sft"]
    worker_device(ppo.resources)
    import ray.train
    import torch

    from bp_ray.train.metrics import MetricsWriter
    from bp_ray.train.sft import read_pairs_frame
    from bp_ray.train.sft_data import batches_for_rank, epoch_order, split_held_out

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = "cuda" if ppo.resources.use_gpu else "cpu"
    if ppo.resources.use_gpu:
        import ray.train.torch as rtt

        device = str(rtt.get_device())
    torch.manual_seed(ppo.seed)  # the critic's new value head: the same start on every rank and every run
    model = _ActorCritic(ppo, config["models"], config["sft_model"], device, world)
    actors = actor_group(rank, ppo.workers_per_actor)  # this worker's reference and reward actors
    reference, scorer = config["reference"][actors], Scorer(config["reward"][actors], ppo, guards_for(ppo))
    pairs = read_pairs_frame(Path(config["pairs_dir"]))
    held_out = split_held_out(pairs[C.PAIR_ID].tolist(), sft.eval_fraction, sft.seed)
    train, evaluation = (with_room(part.reset_index(drop=True), scorer, ppo.prompt_reward_below)
                         for part in (pairs[~held_out], pairs[held_out]))
    evaluation = evaluation.head(ppo.eval_prompts)
    if evaluation.empty and ppo.prompt_reward_below is not None:
        raise ValueError(f"no held-out pair's user prompt scores below ppo.prompt_reward_below="
                         f"{ppo.prompt_reward_below}: nothing to evaluate PPO on")
    group = ppo.group_size if ppo.algorithm != "ppo" else 1
    prompts = ppo.rollout_batch_size // group  # per iteration, over all workers; each sampled `group` times
    if len(train) < prompts:
        raise ValueError(f"{len(train)} training pairs are fewer than the {prompts} prompts of an iteration"
                         + (f" (ppo.prompt_reward_below={ppo.prompt_reward_below})"
                            if ppo.prompt_reward_below is not None else ""))
    controller = kl_controller(ppo.init_kl_coef, ppo.kl_target, ppo.kl_horizon)
    held_out_lows = evaluation[C.LOW].tolist()[rank::world]

    state: dict[str, Any] = {"step": 0, "metrics": {}, "starts": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = restore_checkpoint(model.engine, Path(folder), rank)
            controller.load_state_dict(state["kl_controller"])
    else:
        state["initial_eval"] = evaluate(model, ppo, sft, held_out_lows, scorer, world)  # the SFT policy's, to compare
    state["starts"] = [*state.get("starts", []), state["step"]]
    start_step = state["step"]
    end_step = min(ppo.total_steps, ppo.stop_after_step) if ppo.stop_after_step else ppo.total_steps
    writer = MetricsWriter(Path(config["metrics_dir"]), enabled=rank == 0, start_step=start_step)
    progress = progress_bar(ppo.algorithm, ppo.total_steps, start_step) if rank == 0 else None
    per_epoch = len(train) // prompts

    def batch_rows(step: int) -> Any:
        epoch, index = divmod(step, per_epoch)
        rows = train.iloc[batches_for_rank(epoch_order(len(train), epoch, ppo.seed), prompts, rank, world)[index]]
        return rows.iloc[np.repeat(np.arange(len(rows)), group)]  # a group's responses side by side

    rollouts = _Rollouts(model, ppo, sft, scorer, reference, config, batch_rows, rank, end_step)
    for step in range(start_step, end_step):
        began = time.perf_counter()
        exp = rollouts.get(step)
        sampled = time.perf_counter()
        adv, returns, kl = advantages(exp, controller.value, ppo)
        stats = update(model, exp, adv, returns, ppo, world, controller.value)

        mask = exp.rollout.mask.to(kl.device)
        local = {**exp.reward_terms, **stats,
                 **{f"reward/{name}": float(np.mean(values)) for name, values in exp.scores.items()
                    if name not in ("reward", "relevance")},
                 "kl": float((kl * mask).sum(-1).mean()), "response_tokens": float(mask.sum(-1).mean()),
                 **({"explained_variance": explained_variance(exp.old_values, returns, mask)}
                    if returns is not None else {}),
                 "rollout/lag": float(step - exp.policy_step), "time/generate_s": exp.generate_s,
                 "time/reward_s": exp.reward_s, "time/rollout_wait_s": sampled - began,
                 "time/update_s": time.perf_counter() - sampled}
        metrics = _all_mean(local, world)
        metrics["kl_coef"] = controller.value
        controller.update(metrics["kl"], ppo.rollout_batch_size)
        metrics["perf/samples_per_s"] = ppo.rollout_batch_size / (time.perf_counter() - began)
        done = step + 1
        checkpoint_now = done % ppo.checkpoint_every == 0 or done == end_step
        if checkpoint_now:
            metrics.update(evaluate(model, ppo, sft, held_out_lows, scorer, world))
        # The row before the checkpoint, as in loop.train_on_worker: each step logged once whenever a kill lands.
        log_step(writer, progress, done, metrics,
                 f"{ppo.algorithm} reward {metrics['reward/combined']:.3f} kl {metrics['kl']:.2f}")
        if checkpoint_now:
            state.update(step=done, metrics=metrics, total_steps=ppo.total_steps,
                         kl_controller=controller.state_dict())
            report_checkpoint(save_checkpoint(model.engine, model.save_models, state, rank,
                                              ppo.deepspeed.zero_stage), metrics, done)
    finish_logs(writer, progress)


def run_ppo(ppo: PPOConfig, sft: SFTConfig, cluster: ClusterConfig, reward: RewardSetup, reward_pool: ActorPoolConfig,
            pairs_dir: Path, sft_dir: Path, rm_dir: Path | None, out_dir: Path, resume: bool = False,
            cache_path: Path | None = None) -> dict[str, Any]:
    """PPO on Ray Train with the reference and reward actors (a pair per ppo.workers_per_actor workers); exports
    the policy to out_dir/model.

    `sft` gives the instruction template and the held-out split, `reward` the models and what the online reward
    renders and scores (or, for ppo.reward_source=rm, alpha), `reward_pool` the custom resources of the online
    reward's actor."""
    import ray

    from bp_ray.ray_runtime import init_ray, require_resources
    from bp_ray.train.loop import finish_stage, fit, worker_gpus
    from bp_ray.train.ppo_actors import start_reference_actor, start_reward_actor
    from bp_ray.train.sft import read_pairs_frame

    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    sft_model = Path(sft_dir).resolve() / MODEL_DIR
    if not (sft_model / "config.json").exists():
        raise FileNotFoundError(f"no SFT model at {sft_model}: run `bp-ray train sft` first (or pass --sft)")
    read_pairs_frame(pairs_dir)  # fail here, clearly, rather than inside every worker or actor
    if ppo.reward_source == "rm":
        if rm_dir is None:
            raise ValueError("ppo.reward_source=rm needs the reward models (--rm DIR), or set ppo.reward_source=online")
        if not (Path(rm_dir) / MANIFEST).exists():
            raise FileNotFoundError(f"no reward models at {rm_dir}: run `bp-ray train rm` first (or pass --rm)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SUCCESS).unlink(missing_ok=True)
    if not resume:
        shutil.rmtree(out_dir / "metrics", ignore_errors=True)
    init_ray(cluster)
    workers = ppo.resources
    groups = actor_groups(workers.num_workers, ppo.workers_per_actor)
    actors = 2 * groups + (workers.num_workers if ppo.async_rollout else 0)  # reference, reward (and rollout actors)
    require_resources(cluster, workers.num_workers * workers.cpus_per_worker + actors * ppo.actor_cpus,
                      worker_gpus(workers) + actors * ppo.actor_gpus,
                      "ppo (train workers + reference, reward and rollout actors)")
    # One reference and one reward actor per group of ppo.workers_per_actor workers; worker r uses group
    # actor_group(r, ...). Started in the try so that the finally kills those that started when a later one fails.
    references: list[Any] = []
    rewards: list[Any] = []

    def loop_config() -> dict[str, Any]:
        """Fresh actors for each fit: a fit that gave up may have spent their restarts (train/loop.py fit)."""
        for actor in (*references, *rewards):
            ray.kill(actor)
        references.clear()
        rewards.clear()
        for _ in range(groups):
            references.append(start_reference_actor(ppo, reward.models, sft_model))
            rewards.append(start_reward_actor(ppo, reward, reward_pool, Path(rm_dir).resolve() if rm_dir else None,
                                              cache_path))
        return {"ppo": ppo, "sft": sft, "models": reward.models, "pairs_dir": str(Path(pairs_dir).resolve()),
                "sft_model": str(sft_model), "metrics_dir": str(out_dir / "metrics"), "reference": list(references),
                "reward": list(rewards)}

    try:
        checkpoint, state, storage = fit(cluster, "ppo", ppo_worker_loop, loop_config, ppo.resources, out_dir, resume)
        reference_calls = ray.get([actor.calls.remote() for actor in references])
        critic = checkpoint / CRITIC_DIR
        if critic.exists():
            shutil.rmtree(out_dir / CRITIC_DIR, ignore_errors=True)
            shutil.copytree(critic, out_dir / CRITIC_DIR)
        return finish_stage("ppo", out_dir, checkpoint, state, {
            "initial_eval": state.get("initial_eval", {}), "sft_model": str(sft_model),
            "reward_source": ppo.reward_source, "rm": str(rm_dir) if rm_dir else None,
            "workers": ppo.resources.num_workers, "kl_coef": state["kl_controller"]["value"],
            "actor_groups": groups, "reference_calls": reference_calls, "checkpoints": storage}, started)
    finally:
        for actor in (*references, *rewards):
            ray.kill(actor)
