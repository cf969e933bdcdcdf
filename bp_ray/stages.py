"""The pipeline's stages, each declared once: the folders it reads, the config values its output depends on, and
how it runs.

Everything else derives from this list: the run folder's subfolders (`layout.py`), the order, inputs and
fingerprints of `bp-ray pipeline` (`pipeline.py`), and the input options and run call of each stage command
(`bp-ray data generate`, `bp-ray train sft`, ...; `cli.py`). A stage's run function takes the config, its input
folders by stage name, its output folder and whether to resume, and returns the manifest it wrote.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bp_ray.config import PipelineConfig

RunFn = Callable[[PipelineConfig, dict[str, Path], Path, bool], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    reads: dict[str, str]
    """Input option of the stage command -> the stage whose folder it is (`--pairs` is the data stage's)."""
    config_keys: tuple[str, ...]
    """Dotted config keys that decide the stage's output; a `-key` leaves that part out of the key before it.
    Resources and service batching change how fast a stage runs, not what it writes, except for training,
    where the number of workers changes the batches, so the training sections count whole."""
    run: RunFn

    @property
    def inputs(self) -> tuple[str, ...]:
        """The stages this one reads, in declaration order."""
        return tuple(dict.fromkeys(self.reads.values()))


def _corpus(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, resume: bool) -> dict[str, Any]:
    from bp_ray.data.corpus import write_corpus
    from bp_ray.data.pipeline import corpus_spec
    from bp_ray.layout import MANIFEST

    out.mkdir(parents=True, exist_ok=True)
    if cfg.data.source != "corpus":  # the pairs come from real prompt files: nothing to generate
        manifest: dict[str, Any] = {"stage": "corpus", "not_used": True, "source": cfg.data.source}
    else:
        manifest = asdict(write_corpus(out, corpus_spec(cfg)))  # itself skips a corpus that is up to date
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _data(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, resume: bool) -> dict[str, Any]:
    from bp_ray.data.pipeline import run_data_generation

    return run_data_generation(cfg, out, inputs["corpus"], fresh=not resume)


def _rewards(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, resume: bool) -> dict[str, Any]:
    from bp_ray.rewards.pipeline import run_reward_labels

    return run_reward_labels(cfg, inputs["data"], out)  # the reward cache is its resume


def _sft(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, resume: bool) -> dict[str, Any]:
    from bp_ray.train.sft import run_sft

    return run_sft(cfg, inputs["data"], out, resume=resume)


def _rm(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, resume: bool) -> dict[str, Any]:
    from bp_ray.train.reward import run_rm

    return run_rm(cfg, inputs["rewards"], out, resume=resume)


def _ppo(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, resume: bool) -> dict[str, Any]:
    from bp_ray.rewards.pipeline import reward_cache_path
    from bp_ray.train.ppo import run_ppo

    rm = inputs["rm"] if cfg.ppo.reward_source == "rm" else None
    return run_ppo(cfg, inputs["data"], inputs["sft"], rm, out, resume=resume,
                   cache_path=reward_cache_path(cfg, inputs["rewards"]))


def _eval(cfg: PipelineConfig, inputs: dict[str, Path], out: Path, resume: bool) -> dict[str, Any]:
    from bp_ray.eval.run import run_evaluation

    return run_evaluation(cfg, out, sft=inputs["sft"], ppo=inputs["ppo"], training_dirs=dict(inputs))


STAGES = (
    Stage("corpus", {}, ("seed", "data.source", "data.corpus_rows", "data.corpus_seed", "data.corpus_kind",
                         "data.corpus_image_size"), _corpus),
    Stage("data", {"corpus": "corpus"},
          ("seed", "data", "-data.render", "-data.num_seeds", "-data.renderer_pool", "-data.scorer_pool",
           "-data.captioner_pool", "-data.rewriter_pool", "-data.aesthetic_pool", "models"), _data),
    Stage("rewards", {"pairs": "data"},
          ("data.render", "data.num_seeds", "rewards", "-rewards.service_max_batch", "-rewards.service_batch_wait_s",
           "models"), _rewards),
    Stage("sft", {"pairs": "data"}, ("sft", "models"), _sft),
    Stage("rm", {"labels": "rewards"}, ("rm", "rewards.alpha", "models"), _rm),
    Stage("ppo", {"pairs": "data", "sft": "sft", "rm": "rm", "rewards": "rewards"},
          ("ppo", "sft.instruction", "rewards", "-rewards.service_max_batch", "-rewards.service_batch_wait_s",
           "models"), _ppo),
    # eval reads rm for its training curves
    Stage("eval", {"sft": "sft", "rm": "rm", "ppo": "ppo"},
          ("eval", "sft.instruction", "rewards.alpha", "rewards.seed_base", "models", "data.openai_base_url",
           "data.openai_model", "data.openai_api", "data.corpus_rows", "data.corpus_seed", "data.corpus_kind"),
          _eval),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
BY_NAME = {stage.name: stage for stage in STAGES}
