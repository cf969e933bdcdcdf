"""PPO on Ray Train + DeepSpeed with reference and reward actors: on the tiny world it raises the held-out reward
over the SFT policy while the KL stays near its target; a stopped run resumes and a killed worker is replaced."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from bp_ray.config_loader import load_config
from bp_ray.rewards.labeler import RewardSetup
from bp_ray.train.ppo import run_ppo
from bp_ray.train.reward import run_rm
from bp_ray.train.sft import run_sft
from tests.integration.ray_train_faults import worker_killer
from tests.integration.train_inputs import corpus_pairs, model_weights, synthetic_labels


def ppo_run(cfg, *args, **kwargs) -> dict:
    """run_ppo with this config's sections (the online reward renders and scores as the labels did)."""
    return run_ppo(cfg.ppo, cfg.sft, cfg.cluster, RewardSetup.for_labels(cfg.data, cfg.rewards, cfg.models),
                   cfg.data.scorer_pool, *args, **kwargs)

def sft_run(cfg, *args, **kwargs) -> dict:
    return run_sft(cfg.sft, cfg.models, cfg.cluster, *args, **kwargs)

def rm_run(cfg, *args, **kwargs) -> dict:
    return run_rm(cfg.rm, cfg.rewards, cfg.models, cfg.cluster, *args, **kwargs)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(ray_session, tiny_models_cfg, tmp_path_factory) -> dict[str, Path]:
    """Pairs, an SFT policy and reward models whose labels reward tags and words (a learnable signal)."""
    root = tmp_path_factory.mktemp("ppo-inputs")
    pairs = corpus_pairs(root / "data", rows=800)
    base = [f"models.zoo_dir={tiny_models_cfg.zoo_dir}"]
    sft_run(load_config("tiny", [*base, "sft.epochs=3", "sft.lr=3e-3", "sft.checkpoint_every=1000",
                                 "sft.eval_fraction=0.1"]), pairs, root / "sft")
    rm_run(load_config("tiny", [*base, "rm.heads=shared_backbone", "rm.epochs=4", "rm.lr=2e-3", "rm.batch_size=32",
                                "rm.checkpoint_every=1000"]), synthetic_labels(pairs, root / "rewards"), root / "rm")
    return {"pairs": pairs, "sft": root / "sft", "rm": root / "rm"}


def ppo_cfg(zoo_dir: str, *overrides: str):
    return load_config("tiny", [f"models.zoo_dir={zoo_dir}", "sft.eval_fraction=0.1", *overrides])


@pytest.mark.timeout(1800)  # the first test pays for the module's `trained` fixture: 4 min alone, 13 beside another
def test_ppo_raises_the_held_out_reward_over_sft_within_the_kl_budget(trained, tiny_models_cfg, tmp_path):
    cfg = ppo_cfg(tiny_models_cfg.zoo_dir, "ppo.total_steps=30", "ppo.checkpoint_every=10")
    manifest = ppo_run(cfg, trained["pairs"], trained["sft"], trained["rm"], tmp_path / "ppo")
    before, after = manifest["initial_eval"]["eval/reward"], manifest["final_metrics"]["eval/reward"]
    metrics = pd.read_csv(tmp_path / "ppo" / "metrics" / "metrics.csv")
    late_kl = metrics["kl"].iloc[-10:].mean()
    print(f"held-out reward (greedy): SFT {before:.3f} -> PPO {after:.3f}; KL over the last 10 iterations "
          f"{late_kl:.3f} (target {cfg.ppo.kl_target}), coefficient {manifest['kl_coef']:.4f}")
    assert after > before + 0.1
    assert late_kl < 3 * cfg.ppo.kl_target
    assert manifest["complete"] and (tmp_path / "ppo" / "model" / "model.safetensors").exists()
    assert (tmp_path / "ppo" / "critic" / "model.safetensors").exists()
    logged = {"reward/combined", "reward/baseline", "reward/relevance", "guard/repetition", "guard/words_over_cap",
              "kl", "kl_coef", "entropy", "response_tokens", "clipfrac", "loss/value", "explained_variance",
              "perf/samples_per_s"}
    assert logged <= set(metrics.columns)
    assert metrics["step"].tolist() == list(range(1, 31))


# PPO's: 2 min alone, 6 beside another test process; the training loop's stop and resume (the same code for SFT, RM
# and PPO) is tested in test_train_recovery.py, and a resumed pipeline job in test_job_submit.py
# Three runs, 3 min: `make test-all`. In `make test`, the async GRPO test below resumes a stopped run and the job
# test resumes a stopped SFT job; test_train_recovery.py checks that a resumed SFT run ends with the same weights.
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_stopped_and_resumed_run_ends_like_an_uninterrupted_one(algorithm, trained, tiny_models_cfg, tmp_path):
    common = (f"ppo.algorithm={algorithm}", "ppo.total_steps=4", "ppo.checkpoint_every=2", "ppo.ppo_epochs=2",
              "ppo.eval_prompts=4")
    args = (trained["pairs"], trained["sft"], trained["rm"])
    whole = ppo_run(ppo_cfg(tiny_models_cfg.zoo_dir, *common), *args, tmp_path / "whole")
    first = ppo_run(ppo_cfg(tiny_models_cfg.zoo_dir, *common, "ppo.stop_after_step=2"), *args, tmp_path / "split")
    assert first["steps"] == 2 and not first["complete"]
    second = ppo_run(ppo_cfg(tiny_models_cfg.zoo_dir, *common), *args, tmp_path / "split", resume=True)
    assert second["complete"] and second["starts"] == [0, 2]
    assert second["kl_coef"] == pytest.approx(whole["kl_coef"], rel=1e-6)
    expected, got = model_weights(tmp_path / "whole"), model_weights(tmp_path / "split")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert second["final_metrics"]["reward/combined"] == pytest.approx(whole["final_metrics"]["reward/combined"],
                                                                       rel=1e-4)


@pytest.mark.slow  # the training loop PPO shares is tested with a killed worker in test_train_recovery.py
def test_a_killed_worker_is_replaced_and_ppo_goes_on_from_the_last_checkpoint(trained, tiny_models_cfg, tmp_path):
    out = tmp_path / "ppo"
    cfg = ppo_cfg(tiny_models_cfg.zoo_dir, "ppo.total_steps=8", "ppo.checkpoint_every=2", "ppo.ppo_epochs=1")
    with worker_killer(out / "ray" / "ppo", after_step=2) as killed:
        manifest = ppo_run(cfg, trained["pairs"], trained["sft"], trained["rm"], out)
    assert killed, "no Ray Train worker was found to kill"
    assert manifest["complete"] and manifest["steps"] == 8
    starts = manifest["starts"]
    assert len(starts) >= 2 and starts[0] == 0 and all(s > 0 and s % 2 == 0 for s in starts[1:]), starts
    assert pd.read_csv(out / "metrics" / "metrics.csv")["step"].tolist() == list(range(1, 9))


def test_grpo_raises_the_held_out_reward_with_no_critic(trained, tiny_models_cfg, tmp_path):
    cfg = ppo_cfg(tiny_models_cfg.zoo_dir, "ppo.algorithm=grpo", "ppo.group_size=4", "ppo.total_steps=30",
                  "ppo.checkpoint_every=10")
    manifest = ppo_run(cfg, trained["pairs"], trained["sft"], trained["rm"], tmp_path / "grpo")
    before, after = manifest["initial_eval"]["eval/reward"], manifest["final_metrics"]["eval/reward"]
    print(f"held-out reward (greedy): SFT {before:.3f} -> GRPO {after:.3f}")
    assert after > before + 0.1
    assert manifest["complete"] and (tmp_path / "grpo" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "grpo" / "critic").exists()
    metrics = pd.read_csv(tmp_path / "grpo" / "metrics" / "metrics.csv")
    assert {"loss/kl", "kl", "kl_coef", "clipfrac", "reward/combined"} <= set(metrics.columns)
    assert not {"loss/value", "explained_variance"} & set(metrics.columns)
    assert (metrics["loss/kl"] >= 0).all()  # the k3 estimate is never negative
    assert (metrics["rollout/lag"] == 0).all()  # on-policy


def test_grpo_with_async_rollouts_learns_one_update_behind_and_resumes(trained, tiny_models_cfg, tmp_path):
    common = ("ppo.algorithm=grpo", "ppo.async_rollout=true", "ppo.total_steps=30", "ppo.checkpoint_every=10")
    args = (trained["pairs"], trained["sft"], trained["rm"], tmp_path / "grpo")
    first = ppo_run(ppo_cfg(tiny_models_cfg.zoo_dir, *common, "ppo.stop_after_step=10"), *args)
    assert first["steps"] == 10 and not first["complete"]
    manifest = ppo_run(ppo_cfg(tiny_models_cfg.zoo_dir, *common), *args, resume=True)
    before, after = manifest["initial_eval"]["eval/reward"], manifest["final_metrics"]["eval/reward"]
    print(f"held-out reward (greedy): SFT {before:.3f} -> async GRPO {after:.3f}")
    assert manifest["complete"] and manifest["starts"] == [0, 10]
    assert after > before + 0.1
    metrics = pd.read_csv(tmp_path / "grpo" / "metrics" / "metrics.csv")
    assert metrics["step"].tolist() == list(range(1, 31))
    # Sampled by the weights of before the previous update, except the first iteration of each start.
    lag = dict(zip(metrics["step"], metrics["rollout/lag"], strict=True))
    assert {step for step, value in lag.items() if value == 0} == {1, 11}
    assert {value for value in lag.values()} == {0, 1}


@pytest.mark.slow  # the training loop's killed worker is also tested in test_train_recovery.py
def test_a_killed_worker_is_replaced_and_rloo_goes_on_from_the_last_checkpoint(trained, tiny_models_cfg, tmp_path):
    out = tmp_path / "rloo"
    cfg = ppo_cfg(tiny_models_cfg.zoo_dir, "ppo.algorithm=rloo", "ppo.total_steps=6", "ppo.checkpoint_every=2",
                  "ppo.ppo_epochs=1", "ppo.eval_prompts=4")
    with worker_killer(out / "ray" / "ppo", after_step=2) as killed:
        manifest = ppo_run(cfg, trained["pairs"], trained["sft"], trained["rm"], out)
    assert killed, "no Ray Train worker was found to kill"
    assert manifest["complete"] and manifest["steps"] == 6
    starts = manifest["starts"]
    assert len(starts) >= 2 and starts[0] == 0 and all(s > 0 and s % 2 == 0 for s in starts[1:]), starts


def test_rloo_with_the_kl_in_the_loss_and_per_term_normalisation_runs(trained, tiny_models_cfg, tmp_path):
    cfg = ppo_cfg(tiny_models_cfg.zoo_dir, "ppo.algorithm=rloo", "ppo.kl_in=loss", "ppo.normalize_terms=true",
                  "ppo.group_size=2", "ppo.total_steps=2", "ppo.checkpoint_every=2", "ppo.ppo_epochs=1",
                  "ppo.eval_prompts=4")
    manifest = ppo_run(cfg, trained["pairs"], trained["sft"], trained["rm"], tmp_path / "rloo")
    assert manifest["complete"]
    assert manifest["actor_groups"] == 1 and manifest["reference_calls"] == [2]  # one reference, once an iteration
    metrics = pd.read_csv(tmp_path / "rloo" / "metrics" / "metrics.csv")
    assert "loss/kl" in metrics.columns and metrics["reward/combined"].notna().all()


def test_shared_value_head_and_online_rewards_run(trained, tiny_models_cfg, tmp_path):
    cfg = ppo_cfg(tiny_models_cfg.zoo_dir, "ppo.total_steps=2", "ppo.checkpoint_every=2", "ppo.ppo_epochs=1",
                  "ppo.value_model=shared", "ppo.reward_source=online", "ppo.relevance_coef=0.1",
                  "ppo.eval_prompts=4")
    manifest = ppo_run(cfg, trained["pairs"], trained["sft"], None, tmp_path / "ppo",
                       cache_path=tmp_path / "cache.sqlite")
    assert manifest["complete"] and manifest["reward_source"] == "online"
    assert (tmp_path / "ppo" / "model" / "value_head.safetensors").exists()
    metrics = pd.read_csv(tmp_path / "ppo" / "metrics" / "metrics.csv")
    # online relevance is the CLIP score of the rendered images against the low prompt: never exactly 0
    assert (metrics["reward/relevance"] != 0).all() and metrics["reward/combined"].notna().all()
    with pytest.raises(ValueError, match="--rm"):
        ppo_run(ppo_cfg(tiny_models_cfg.zoo_dir), trained["pairs"], trained["sft"], None, tmp_path / "no-rm")


def test_two_workers_with_their_own_actors_train_and_the_kl_coefficient_follows_the_controller(trained,
                                                                                           tiny_models_cfg, tmp_path):
    # workers_per_actor=1: each worker has its own reference and reward actor (2 x 0.5 + 4 x 0.25 CPUs fill the 2).
    cfg = ppo_cfg(tiny_models_cfg.zoo_dir, "ppo.total_steps=3", "ppo.checkpoint_every=3", "ppo.ppo_epochs=1",
                  "ppo.eval_prompts=4", "ppo.resources.num_workers=2", "ppo.resources.cpus_per_worker=0.5",
                  "ppo.workers_per_actor=1")
    manifest = ppo_run(cfg, trained["pairs"], trained["sft"], trained["rm"], tmp_path / "ppo")
    assert manifest["complete"] and manifest["workers"] == 2
    # Two reference actors, each asked once per iteration by its own worker only.
    assert manifest["actor_groups"] == 2 and manifest["reference_calls"] == [3, 3]
    metrics = pd.read_csv(tmp_path / "ppo" / "metrics" / "metrics.csv")
    # Ziegler et al.: beta <- beta * (1 + clip(KL / target - 1, +-0.2) * n / horizon), KL averaged over both ranks.
    coef = cfg.ppo.init_kl_coef
    for kl, logged in zip(metrics["kl"], metrics["kl_coef"], strict=True):
        assert logged == pytest.approx(coef, rel=1e-9)
        coef *= 1 + min(max(kl / cfg.ppo.kl_target - 1, -0.2), 0.2) * cfg.ppo.rollout_batch_size / cfg.ppo.kl_horizon
    assert manifest["kl_coef"] == pytest.approx(coef, rel=1e-9)


def test_eval_text_judges_each_system_on_prompts_it_never_trained_on(trained, tiny_models_cfg, tmp_path):
    """`bp-ray eval-text` on the SFT policy and the RM of the fixture: the pairs' own low prompts are left out."""
    import json
    import subprocess
    import sys

    from bp_ray.data.prompt_rules import dedup_key
    from bp_ray.data.prompt_sources import VocabPrompts
    from bp_ray.eval.prompts import EMBEDDED_SEED

    pairs = pd.concat(pd.read_parquet(p) for p in trained["pairs"].glob("part-*.parquet"))
    keys = pairs["low"].map(dedup_key)
    trained_lows = pairs.loc[~keys.duplicated(), "low"].head(5).tolist()
    # near duplicates (case, punctuation) of a trained prompt count as trained too
    unseen = [p for p in VocabPrompts().eval_prompts(60, EMBEDDED_SEED, set()) if dedup_key(p) not in set(keys)][:12]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [*trained_lows, *unseen]))
    out = tmp_path / "eval_text"
    argv = [sys.executable, "-m", "bp_ray.cli", "eval-text", "--preset", "tiny", "--out", str(out),
            "--sft", str(trained["sft"]), "--rm", str(trained["rm"]), "--pairs", str(trained["pairs"]),
            "--prompts", str(prompts), "--set", f"models.zoo_dir={tiny_models_cfg.zoo_dir}",
            "--set", "eval.max_new_tokens=24", "--run", str(tmp_path / "no-run")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prompts 12 (5 trained left out)" in done.stdout and "| all | sft | 12 |" in done.stdout, done.stdout

    results = json.loads((out / "results_text.json").read_text())
    assert results["systems"] == ["original", "base", "sft"] and results["sets"]["prompts"]["count"] == 12
    table = {row["system"]: row for row in results["table"] if row["set"] == "all"}
    assert table["original"]["subject_kept"] == 1.0 and table["original"]["repetition"] == 0.0
    assert table["sft"]["tags"] > table["original"]["tags"]  # SFT learnt to add tags; the plain prompts have none
    assert table["sft"]["rm_score"] > table["original"]["rm_score"]  # and the RM rewards tags (its labels do)
    rows = [json.loads(line) for line in (out / "rewrites_text.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 12 and {r["prompt"] for r in rows} == set(unseen)
