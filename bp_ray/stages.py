"""The pipeline's stages, each declared once: the folders it reads, the config values its output depends on, and
how it runs.

Everything else derives from this list: the run folder's subfolders (`layout.py`), the order, inputs and
fingerprints of `bp-ray pipeline` (`pipeline.py`), and the input options and run call of each stage command
(`bp-ray data generate`, `bp-ray train sft`, ...; `cli.py`). A stage's run function takes only the config sections
it declares (as keyword arguments), its input folders by stage name, its output folder and whether to resume, and
returns the manifest it wrote; `run_stage` hands it those sections of a whole config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bp_ray.config import (
    ClusterConfig,
    DataConfig,
    EvalConfig,
    ModelsConfig,
    PipelineConfig,
    PPOConfig,
    RewardsConfig,
    RMConfig,
    SFTConfig,
)

RunFn = Callable[..., dict[str, Any]]
"""run(inputs, out, resume, **sections) -> manifest; `sections` are exactly the stage's declared ones."""


@dataclass(frozen=True)
class Stage:
    name: str
    reads: dict[str, str]
    """Input option of the stage command -> the stage whose folder it is (`--pairs` is the data stage's)."""
    sections: tuple[str, ...]
    """The config sections (top-level keys) the run function receives, and all it receives."""
    config_keys: tuple[str, ...]
    """Dotted config keys that decide the stage's output; a `-key` leaves that part out of the key before it.
    Resources and service batching change how fast a stage runs, not what it writes, except for training,
    where the number of workers changes the batches, so the training sections count whole."""
    run: RunFn
    check: Callable[..., None] | None = None
    """Raises, before any work, when the config cannot run the stage at all (the data stage without a source);
    takes the same sections as `run`. `bp-ray pipeline` checks every stage it will run before it runs the first."""

    @property
    def inputs(self) -> tuple[str, ...]:
        """The stages this one reads, in declaration order."""
        return tuple(dict.fromkeys(self.reads.values()))


def check_stage(stage: Stage, cfg: PipelineConfig) -> None:
    """The stage's own check of `cfg` (see Stage.check), if it has one."""
    if stage.check is not None:
        stage.check(**{name: getattr(cfg, name) for name in stage.sections})


def run_stage(stage: Stage, cfg: PipelineConfig, inputs: dict[str, Path], out: Path, resume: bool) -> dict[str, Any]:
    """Run one stage with its declared sections of `cfg`, after its check."""
    check_stage(stage, cfg)
    return stage.run(inputs, out, resume, **{name: getattr(cfg, name) for name in stage.sections})


def _corpus(inputs: dict[str, Path], out: Path, resume: bool, *, data: DataConfig) -> dict[str, Any]:
    from bp_ray.data.corpus import write_corpus
    from bp_ray.data.pipeline import corpus_spec
    from bp_ray.layout import MANIFEST

    out.mkdir(parents=True, exist_ok=True)
    if data.source != "corpus":  # the pairs come from real prompt files: nothing to generate
        manifest: dict[str, Any] = {"stage": "corpus", "not_used": True, "source": data.source}
    else:
        manifest = asdict(write_corpus(out, corpus_spec(data)))  # itself skips a corpus that is up to date
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _data(inputs: dict[str, Path], out: Path, resume: bool, *, data: DataConfig, models: ModelsConfig,
          cluster: ClusterConfig) -> dict[str, Any]:
    from bp_ray.data.pipeline import run_data_generation

    return run_data_generation(data, models, cluster, out, inputs["corpus"], fresh=not resume)


def _check_data(*, data: DataConfig, models: ModelsConfig, cluster: ClusterConfig) -> None:
    from bp_ray.data.pipeline import require_source

    require_source(data)


def _rewards(inputs: dict[str, Path], out: Path, resume: bool, *, data: DataConfig, rewards: RewardsConfig,
             models: ModelsConfig, cluster: ClusterConfig) -> dict[str, Any]:
    from bp_ray.rewards.pipeline import run_reward_labels

    return run_reward_labels(data, rewards, models, cluster, inputs["data"], out)  # the reward cache is its resume


def _sft(inputs: dict[str, Path], out: Path, resume: bool, *, sft: SFTConfig, models: ModelsConfig,
         cluster: ClusterConfig) -> dict[str, Any]:
    from bp_ray.train.sft import run_sft

    return run_sft(sft, models, cluster, inputs["data"], out, resume=resume)


def _rm(inputs: dict[str, Path], out: Path, resume: bool, *, rm: RMConfig, rewards: RewardsConfig,
        models: ModelsConfig, cluster: ClusterConfig) -> dict[str, Any]:
    from bp_ray.train.reward import run_rm

    return run_rm(rm, rewards, models, cluster, inputs["rewards"], out, resume=resume)


def _ppo(inputs: dict[str, Path], out: Path, resume: bool, *, ppo: PPOConfig, sft: SFTConfig, data: DataConfig,
         rewards: RewardsConfig, models: ModelsConfig, cluster: ClusterConfig) -> dict[str, Any]:
    from bp_ray.rewards.labeler import RewardSetup
    from bp_ray.rewards.pipeline import reward_cache_path
    from bp_ray.train.ppo import run_ppo

    # The online reward renders and scores as the labels were: data.render, data.num_seeds, the scorer pool.
    rm = inputs["rm"] if ppo.reward_source == "rm" else None
    return run_ppo(ppo, sft, cluster, RewardSetup.for_labels(data, rewards, models), data.scorer_pool,
                   inputs["data"], inputs["sft"], rm, out, resume=resume,
                   cache_path=reward_cache_path(rewards, inputs["rewards"]))


def _eval(inputs: dict[str, Path], out: Path, resume: bool, *, eval: EvalConfig, sft: SFTConfig, data: DataConfig,
          rewards: RewardsConfig, models: ModelsConfig, cluster: ClusterConfig, preset: str) -> dict[str, Any]:
    from bp_ray.eval.run import run_evaluation

    return run_evaluation(eval, sft, data, rewards, models, cluster, out, preset=preset, sft_dir=inputs["sft"],
                          ppo_dir=inputs["ppo"], training_dirs=dict(inputs))


STAGES = (
    Stage("corpus", {}, ("data",),
          ("data.source", "data.corpus_rows", "data.corpus_seed", "data.corpus_kind",
           "data.corpus_image_size"), _corpus),
    Stage("data", {"corpus": "corpus"}, ("data", "models", "cluster"),
          ("data", "-data.render", "-data.num_seeds", "-data.renderer_pool", "-data.scorer_pool",
           "-data.captioner_pool", "-data.rewriter_pool", "-data.aesthetic_pool", "-data.fused", "-data.model_pool",
           "models"), _data, _check_data),
    Stage("rewards", {"pairs": "data"}, ("data", "rewards", "models", "cluster"),
          ("data.render", "data.num_seeds", "rewards", "-rewards.service_max_batch", "-rewards.service_batch_wait_s",
           "models"), _rewards),
    Stage("sft", {"pairs": "data"}, ("sft", "models", "cluster"), ("sft", "models"), _sft),
    Stage("rm", {"labels": "rewards"}, ("rm", "rewards", "models", "cluster"), ("rm", "rewards.alpha", "models"),
          _rm),
    Stage("ppo", {"pairs": "data", "sft": "sft", "rm": "rm", "rewards": "rewards"},
          ("ppo", "sft", "data", "rewards", "models", "cluster"),
          ("ppo", "sft.instruction", "rewards", "-rewards.service_max_batch", "-rewards.service_batch_wait_s",
           "models"), _ppo),
    # eval reads rm for its training curves
    Stage("eval", {"sft": "sft", "rm": "rm", "ppo": "ppo"},
          ("eval", "sft", "data", "rewards", "models", "cluster", "preset"),
          ("eval", "sft.instruction", "rewards.alpha", "rewards.seed_base", "models", "data.openai_base_url",
           "data.openai_model", "data.openai_api", "data.corpus_rows", "data.corpus_seed", "data.corpus_kind"),
          _eval),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
BY_NAME = {stage.name: stage for stage in STAGES}
