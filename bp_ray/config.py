"""Typed configuration sections, one dataclass per stage; `bp_ray.config_loader` fills them.

Dataclass defaults hold the method (the paper's hyperparameters); presets set the scale (model ids, batch
sizes, workers, GPUs). Every field may carry `choices` or bounds in its metadata, which
`config_loader.validate()` checks; `ConfigError` names the offending key and what would be accepted. The string
under a field is its help: it lands in the field's metadata (`help`), and `bp-ray config explain KEY` prints it.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import sys
import types
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from bp_ray.extensions import zoo_sections


class ConfigError(ValueError):
    """A config key, type or value that cannot be used; the message names the key and the valid choices."""


def opt(default: Any, *, choices: Sequence[Any] | None = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None) -> Any:
    """A field with optional allowed values (for a list: of its items) or bounds, checked by `validate`."""
    meta = {"choices": tuple(choices) if choices else None, "ge": ge, "gt": gt, "le": le}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("fp32", "bf16", "fp16")


# --- models and cluster resources -------------------------------------------------------------------------

@dataclass
class ModelsConfig:
    """Model for every role: a Hugging Face id, a local directory, `gguf:<name>`, or `<prefix>:<role>` of a model
    resolver an installed backend registers (bp-ray's embedded one: `tiny:bloom`, `world:sd`, ...)."""

    policy: str = "tiny:bloom"
    """Causal LM that SFT starts from (paper: bigscience/bloom-1b1)."""
    rewriter: str = "tiny:bloom"
    """Local causal LM that summarises / expands prompts in the data stage (when data.llm_backend=local)."""
    rm_backbone: str = "tiny:bloom"
    """Causal LM backbone of the reward models."""
    captioner: str = "tiny:blip"
    """BLIP captioning model (paper pipeline: captions of DiffusionDB images become low-quality prompts)."""
    diffusion: str = "tiny:sd"
    """Stable Diffusion pipeline (diffusers format)."""
    pickscore: str = "tiny:pickscore"
    """CLIP model scoring image-text preference (paper: yuvalkirstain/PickScore_v1)."""
    pickscore_processor: str = ""
    """Processor for the PickScore model; empty means the model's own folder."""
    aesthetic: str = "tiny:aesthetic"
    """Aesthetic predictor folder (open_clip image tower + LAION MLP head), see `bp-ray models convert-aesthetic`."""
    clip_relevance: str = "tiny:clip"
    """CLIP model for image-prompt relevance."""
    text_encoder: str = ""
    """Sentence encoder judging a rewrite's content against the user's prompt (eval-text's content_similarity, the
    text reward's relevance with ppo.relevance_model=text_encoder): `pkg:all-minilm-l6-v2` (installed by
    `make install`) or sentence-transformers/all-MiniLM-L6-v2; empty: not used."""
    zoo_dir: str = ""
    """Where built and imported models are cached; empty means $BP_RAY_CACHE/zoo or ~/.cache/bp-ray/zoo."""
    dtype: str = opt("float32", choices=DTYPES)
    """Weights dtype for inference roles."""
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    zoo: dict[str, Any] = field(default_factory=zoo_sections, metadata={"sections": True})
    """Settings of each backend that builds models, by name, as the backend registers them (bp_ray.extensions):
    `models.zoo.tiny.*` sizes the tiny zoo, `models.zoo.world.*` trains it in the miniature world."""


@dataclass
class ClusterConfig:
    """Where stages run and write; resources for each stage live in the stage's own section."""

    address: str = ""
    """Ray address: empty starts a local Ray (or joins RAY_ADDRESS when set), `auto` joins a running cluster."""
    num_cpus: int = opt(0, ge=0)
    """CPUs for a local Ray; 0 lets Ray count them."""
    storage_path: str = ""
    """Shared storage for Ray Train checkpoints (s3://, gs://, NFS); empty means <run dir>/<stage>/ray."""


@dataclass
class ActorPoolConfig:
    """An autoscaling Ray Data actor pool holding one model per actor."""

    min_actors: int = opt(1, ge=1)
    max_actors: int = opt(1, ge=1)
    num_cpus: float = opt(1.0, ge=0)
    num_gpus: float = opt(0.0, ge=0)
    batch_size: int = opt(16, ge=1)
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources per actor, e.g. {"a100_node": 1}, to pin a pool to a node type."""


@dataclass
class RenderConfig:
    """Stable Diffusion settings for one rendering of a prompt."""

    height: int = opt(512, ge=8)
    width: int = opt(512, ge=8)
    num_inference_steps: int = opt(20, ge=1)
    guidance_scale: float = opt(7.5, ge=0)
    scheduler: str = opt("euler_ancestral", choices=("ddim", "euler_ancestral", "euler", "dpm_solver", "pndm"))
    long_prompts: str = opt("truncate", choices=("truncate", "chunked"))
    """Prompts over 75 tokens: `truncate` = the text encoder sees the first 77 tokens (BOS + 75 + EOS), as
    diffusers does; `chunked` = 75-token windows each encoded and concatenated (A1111 / compel), so words past
    token 75 still steer the image. Prompts of at most 75 tokens render identically in both."""


# --- stages -----------------------------------------------------------------------------------------------

PAPER_INSTRUCTION = (
    "Instruction: Give a simple description of the image to generate a drawing prompt.\nInput: {raw}\nOutput:"
)


@dataclass
class DataConfig:
    """Prompt-pair generation and reward labelling (Ray Data); paper Section 3."""

    source: str = "corpus"
    """`corpus` (the embedded generated DiffusionDB-shaped corpus), a DiffusionDB folder, or a prompt file."""
    extra_sources: list[str] = field(default_factory=list)
    """More DiffusionDB folders or prompt files, read after `source` and appended in order (`limit` applies to
    each); `--prompts A B C` sets source=A and extra_sources=[B, C]."""
    corpus_kind: str = "prompts"
    """The prompt source of the generated corpus and of the embedded evaluation set: `prompts` (subjects, settings,
    artists and tags of DiffusionDB) or one an installed backend registers (`world`: miniature-world scenes, with
    the world's renders as images)."""
    corpus_image_size: int = opt(32, ge=8)
    """Side of the square image stored per corpus row (what the captioner and the aesthetic filter see)."""
    corpus_rows: int = opt(2000, ge=10)
    corpus_seed: int = 0
    limit: int = opt(0, ge=0)
    """Read at most this many source rows; 0 means all."""
    # 1. normalisation
    max_prompt_chars: int = opt(1000, ge=10)
    """Longer rows are dropped as `too_long`."""
    weights_syntax: str = opt("strip", choices=("strip", "keep"))
    """A1111 emphasis like `(word:1.2)`, `((word))`, `[word]`: strip to plain words (diffusers ignores it) or
    keep in a canonical spelling."""
    # 2. heuristic split (counts are of words, vocabulary tags, and comma-separated segments)
    low_max_words: int = opt(12, ge=1)
    low_max_tags: int = opt(0, ge=0)
    low_max_segments: int = opt(2, ge=1)
    """A low-quality prompt: at most this many words, tags and segments, and no weights / negative syntax."""
    high_min_words: int = opt(8, ge=1)
    high_min_tags: int = opt(2, ge=1)
    high_min_segments: int = opt(4, ge=2)
    """A high-quality prompt: at least high_min_words words, and high_min_tags tags or high_min_segments
    segments; other prompts are neither and stay unused."""
    syntax_tag_bonus: int = opt(1, ge=0)
    """Weights or negative syntax counts as this many extra tags (only prompt engineers write it)."""
    # 3. pair sources
    use_captions: bool = True
    """Pair source (i): BLIP caption of a high-quality prompt's image becomes its low prompt."""
    use_summaries: bool = True
    """Pair source (ii): an LLM summarises a high prompt into a low one."""
    use_expansions: bool = True
    """Pair source (iii): an LLM expands a low prompt into a high one."""
    use_stripped: bool = False
    """Pair source (iv), no model: a high-quality prompt without its vocabulary style / quality tags and artist
    credits (its first low_max_segments segments that are left) becomes its low prompt."""
    llm_fraction: float = opt(1.0, gt=0, le=1)
    """Share of the low / high rows the LLM expands / summarises, chosen by a hash of the row id (an LLM call is
    the stage's main cost: on CPU, or per token with a paid endpoint); the other rows make no LLM pair."""
    pair_files: list[str] = field(default_factory=list)
    """Pair source (v), `given`: files of real low -> high pairs (any prompt file format), the low prompt in
    `prompt`, the high one in pair_high_field; used as they are, then cleaned like every pair."""
    pair_high_field: str = "high"
    pair_files_fraction: float = opt(1.0, gt=0, le=1)
    """Share of each pair file used, chosen by a hash of the low prompt; the rest stays unseen (an evaluation on
    the same prompts leaves the used ones out)."""
    llm_backend: str = opt("local", choices=("local", "openai"))
    """`local`: models.rewriter in an actor pool; `openai`: any OpenAI-compatible endpoint."""
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = "gpt-4o-mini"
    openai_api: str = opt("chat", choices=("chat", "completions"))
    openai_api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (never the key itself)."""
    openai_concurrency: int = opt(4, ge=1)
    """Requests in flight per rewriter actor."""
    openai_timeout_s: float = opt(60.0, gt=0)
    openai_max_retries: int = opt(5, ge=0)
    openai_backoff_s: float = opt(1.0, ge=0)
    """First retry delay; doubles per attempt (a Retry-After header wins)."""
    summarise_template: str = (
        "Summarise this image prompt into a short plain description without style words.\n"
        "Prompt: {prompt}\nSummary:"
    )
    expand_template: str = (
        "Rewrite this short image description into a detailed Stable Diffusion prompt with subject, "
        "setting, style, artist and quality tags.\nDescription: {prompt}\nPrompt:"
    )
    max_new_tokens: int = opt(64, ge=1)
    caption_max_new_tokens: int = opt(30, ge=1)
    # 4. cleaning
    nsfw_threshold: float = opt(0.5, ge=0, le=1)
    """Drop rows whose DiffusionDB prompt_nsfw or image_nsfw score exceeds this."""
    keyword_filter: bool = True
    """Drop rows and pairs with a term from the shipped NSFW / political keyword lists."""
    pair_low_words: list[int] = field(default_factory=lambda: [1, 40])
    pair_high_words: list[int] = field(default_factory=lambda: [3, 200])
    """[min, max] words of a pair's low and high prompt; pairs outside are dropped as `length`."""
    aesthetic_threshold: float | None = None
    """Drop pairs whose high prompt's image scores below this; null turns the filter off."""
    pair_min_low_in_high: float | None = opt(None, ge=0, le=1)
    """Drop pairs (`off_topic`) unless the high prompt holds this share of the low prompt's content words (a caption
    naming an object the high prompt never mentions fails it); null turns the filter off."""
    high_subject_from_low: bool = False
    """Replace each kept pair's high-prompt subject (its first comma segment) by the low prompt, so the beautifier
    learns to keep the user's words and add only what improves the picture (a small LM that must paraphrase the
    subject as well changes it: "a purple triangle and a blue square" -> "... blue square below ... purple square")."""
    pair_min_subject_in_low: float | None = opt(None, ge=0, le=1)
    """Drop pairs (`off_topic`) unless the low prompt holds this share of the content words of the high prompt's
    subject, its first comma segment (a caption leaving out one of two objects fails it); null: off."""
    shard_rows: int = opt(5000, ge=1)
    """Pairs per output Parquet file."""
    # 5. rendering for reward labels
    num_seeds: int = opt(8, ge=1)
    """Images rendered per prompt for reward labels; scores are averaged over seeds (paper Section 3.2)."""
    render: RenderConfig = field(default_factory=RenderConfig)
    fused: bool = False
    """Caption, rewrite, aesthetic-score and commit each batch in one actor of data.model_pool, instead of one pool
    per model (captioner_pool, rewriter_pool, aesthetic_pool) handing batches over through the object store."""
    model_pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """The fused actors (data.fused): each holds every model the stage uses."""
    captioner_pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    rewriter_pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    aesthetic_pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    renderer_pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    scorer_pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)


@dataclass
class RewardsConfig:
    """Image scorers and how their scores combine into one reward."""

    alpha: float = opt(0.7, ge=0, le=1)
    """reward = alpha * PickScore + (1 - alpha) * aesthetic (paper Section 3.3)."""
    pickscore_text: str = opt("prompt", choices=("prompt", "intent"))
    """Text PickScore compares with the image: the rendered prompt, or the pair's low prompt (user intent)."""
    seed_base: int = opt(0, ge=0)
    """Prompts are rendered with seeds seed_base, seed_base + 1, ... (data.num_seeds of them), so every label
    can be reproduced image by image."""
    fused: bool = False
    """Render and score in one actor instead of separate pools (data.renderer_pool / data.scorer_pool)."""
    keep_images: bool = False
    """Also save every rendered image under rewards/images/ (for reports)."""
    image_format: str = opt("webp", choices=("webp", "png"))
    cache_path: str = ""
    """SQLite reward cache; empty means <rewards stage dir>/cache.sqlite."""
    max_prompts: int = opt(0, ge=0)
    """Label only the first this many distinct prompts of the pairs (a quick look, `--dry-run`); 0 labels all."""
    service_max_batch: int = opt(16, ge=1)
    """Reward actor: most prompts rendered in one batch, gathered from concurrent callers."""
    service_batch_wait_s: float = opt(0.02, ge=0)
    """Reward actor: how long the first request of a batch waits for others to join it."""


@dataclass
class TrainResources:
    """Ray Train scaling for one training stage."""

    num_workers: int = opt(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = opt(1.0, ge=0)
    gpus_per_worker: float = opt(1.0, gt=0, le=1)
    """GPU share of each worker with use_gpu; below 1 lets other actors (PPO's reference and reward) share its GPU,
    as on a one-GPU machine."""
    max_failures: int = opt(3, ge=0)
    """Worker failures Ray Train recovers from (restarting from the last checkpoint) before the stage fails."""


@dataclass
class DeepSpeedConfig:
    """What bp-ray writes into the DeepSpeed config it generates."""

    zero_stage: int = opt(2, choices=(0, 1, 2, 3))
    precision: str = opt("bf16", choices=PRECISIONS)
    offload_optimizer: bool = False
    gradient_accumulation_steps: int = opt(1, ge=1)
    gradient_clipping: float = opt(1.0, ge=0)


@dataclass
class TrainingConfig:
    """What SFT and the reward models share: one Ray Train + DeepSpeed loop (train/loop.py) reads these."""

    lr: float = opt(2e-5, gt=0)
    batch_size: int = opt(16, ge=1)
    """Global batch size (split across workers and gradient accumulation)."""
    epochs: float = opt(4.0, gt=0)
    max_length: int = opt(384, ge=8)
    weight_decay: float = opt(0.0, ge=0)
    lr_scheduler: str = opt("cosine", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.03, ge=0, le=1)
    eval_fraction: float = opt(0.05, ge=0, le=0.5)
    checkpoint_every: int = opt(100, ge=1)
    """Steps between checkpoints (Hugging Face model + DeepSpeed state), each with a held-out evaluation."""
    stop_after_step: int = opt(0, ge=0)
    """Stop at this step with a checkpoint, as if interrupted (a time-limited allocation); `--resume` goes on.
    0 runs to the end."""
    seed: int = 42
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    resources: TrainResources = field(default_factory=TrainResources)


@dataclass
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning of the policy: instruction + low prompt -> high prompt (paper Section 4.1)."""

    instruction: str = PAPER_INSTRUCTION
    keep_prompt: bool = False
    """The beautifier's answer begins with the user prompt verbatim and the model writes only what follows (SFT,
    PPO, evaluation and serving alike): the user's subject can never be changed, only added to."""
    packing: bool = False


@dataclass
class RMConfig(TrainingConfig):
    """Reward models: MSE regression onto seed-averaged PickScore and aesthetic labels (paper Section 4.2)."""

    lr: float = opt(1e-5, gt=0)
    epochs: float = opt(1.0, gt=0)
    eval_fraction: float = opt(0.1, ge=0, le=0.5)
    heads: str = opt("two_models", choices=("two_models", "shared_backbone"))
    """One backbone per score (paper) or two scalar heads on one backbone."""
    pickscore_input: str = opt("low+high", choices=("high", "low+high"))
    """Paper: the PickScore RM reads the raw prompt and the generated prompt."""
    aesthetic_input: str = opt("high", choices=("high", "low+high"))
    """Paper: the aesthetic RM reads the generated prompt only."""
    label_roles: list[str] = opt(["low", "high"], choices=("low", "high"))
    """Which labelled prompts of each pair the RMs learn from: the low one, the high one or both."""
    target: str = opt("scores", choices=("scores", "style"))
    """`scores`: regress the rendered images' PickScore and aesthetic (the paper). `style`: one head learns, from
    text alone, whether a prompt reads like a text-to-image prompt people wrote for Stable Diffusion (label 1: the
    style_positive files) or like a plain caption (label 0: style_negative); the reward is that score. For a
    model whose renders cannot be scored (real text on the miniature world's scorers)."""
    style_positive: list[str] = field(default_factory=list)
    """Prompt files (any format `--prompts` reads) of SD-style prompts: DiffusionDB, Discord."""
    style_negative: list[str] = field(default_factory=list)
    """Prompt files of plain captions: COCO captions."""
    style_rows: int = opt(2000, ge=1)
    """Rows read from each style file (the first ones)."""
    style_loss: str = opt("brier", choices=("brier", "logistic"))
    """`brier`: MSE on the 0 / 1 labels, the score is a probability, and it saturates: once a policy's rewrites
    read as SD prompts they all score ~1 and a reward on it has nothing left to climb. `logistic`: binary
    cross-entropy, the score is the log-odds, which keeps ranking prompts that are all SD-like (held-out figures are
    still reported on the probability)."""


@dataclass
class PPOConfig:
    """RL against the reward with a KL penalty to the frozen SFT reference: the paper's PPO with an adaptive KL
    coefficient (Section 4.3), or a critic-free group-relative method (GRPO, RLOO) on the same loop."""

    algorithm: str = opt("ppo", choices=("ppo", "grpo", "rloo"))
    """`ppo` (critic, GAE, KL per token in the reward), `grpo` (group-standardised scores, KL as a k3 loss term) or
    `rloo` (leave-one-out baseline within the group, KL in the reward or the loss: kl_in). The group methods
    sample group_size responses per user prompt and train no critic."""
    group_size: int = opt(4, ge=2)
    """GRPO / RLOO: responses per user prompt; rollout_batch_size counts responses, so it holds
    rollout_batch_size / group_size prompts. All of a prompt's responses are rendered with the same seeds."""
    kl_in: str = opt("reward", choices=("reward", "loss"))
    """RLOO: the KL to the reference as a per-response penalty on the score (k1 summed over tokens) or as GRPO's
    k3 loss term. GRPO always uses the loss term, PPO the per-token reward penalty."""
    normalize_terms: bool = False
    """GRPO / RLOO: standardise each score term (reward, relevance, intent hinge, length, repetition) within its
    group before weighting and summing them (GDPO-style), so a wide-spread term cannot drown a narrow one."""
    group_eps: float = opt(1e-4, gt=0)
    """Added to a group's standard deviation before dividing by it."""
    lr: float = opt(5e-6, gt=0)
    init_kl_coef: float = opt(0.05, ge=0)
    """Initial weight of the KL to the SFT policy (PPO, RLOO with kl_in=reward: the penalty in the reward; GRPO:
    the loss term's coefficient); the adaptive controller moves it for every algorithm."""
    kl_target: float | None = opt(6.0, gt=0)
    """Adaptive KL target (Ziegler et al. 2019); null keeps the coefficient fixed."""
    kl_horizon: int = opt(10000, ge=1)
    ppo_epochs: int = opt(4, ge=1)
    gamma: float = opt(1.0, ge=0, le=1)
    lam: float = opt(0.95, ge=0, le=1)
    clip_range: float = opt(0.2, gt=0)
    clip_range_value: float = opt(0.2, gt=0)
    vf_coef: float = opt(0.5, ge=0)
    """PPO: weight of the value loss in the total loss (the group methods have no critic)."""
    entropy_coef: float = opt(0.0, ge=0)
    max_new_tokens: int = opt(256, ge=1)
    temperature: float = opt(1.0, gt=0)
    top_p: float = opt(1.0, gt=0, le=1)
    rollout_batch_size: int = opt(128, ge=1)
    minibatch_size: int = opt(16, ge=1)
    total_steps: int = opt(2000, ge=1)
    """Rollout-and-update iterations."""
    reward_source: str = opt("rm", choices=("rm", "online"))
    """The trained reward models, or render + score online with the reward actors."""
    reward_baseline: str = opt("reference", choices=("reference", "none"))
    """Paper: reward is the delta against the reward of the reference (SFT) prompt."""
    value_model: str = opt("separate", choices=("separate", "shared"))
    """Critic: a separate token-regression model initialised from the SFT policy, or a value head on the policy."""
    kl_estimator: str = opt("k1", choices=("k1", "k3"))
    """Per-token KL estimate: log p - log p_ref (k1, as Ziegler et al.) or Schulman's non-negative k3."""
    whiten_advantages: bool = True
    relevance_coef: float = opt(0.0, ge=0)
    """Guard: + coef x CLIP similarity of the low prompt to the generated prompt (rm) or to its images (online)."""
    relevance_model: str = opt("clip", choices=("clip", "text_encoder"))
    """What judges the text reward's (reward_source=rm) relevance: CLIP's text tower (models.clip_relevance) or the
    sentence encoder of models.text_encoder, which knows real text where a small world's CLIP does not. The online
    reward always compares images with CLIP."""
    intent_hinge_coef: float = opt(0.0, ge=0)
    """Guard (Promptist-style hinge): - coef x how far the relevance above falls below the relevance of the low
    prompt itself (its own renders, online; 1 for the text reward) minus intent_margin; 0 turns it off. Unlike
    relevance_coef it costs nothing while a rewrite shows the user's request as well as the request does."""
    intent_margin: float = opt(0.0, ge=0)
    """Relevance a rewrite may lose against the low prompt's own before the intent hinge costs anything."""
    max_words: int = opt(0, ge=0)
    """Guard: words beyond this cap cost length_coef each (0: no cap)."""
    length_coef: float = opt(0.0, ge=0)
    repetition_coef: float = opt(0.0, ge=0)
    """Guard: - coef x share of repeated word trigrams in the generated prompt."""
    missing_eos_penalty: float = opt(0.0, ge=0)
    """Guard (TRL's missing_eos_penalty): - this for a response cut at max_new_tokens before its EOS or newline, so
    the policy learns to finish its rewrite within the budget rather than stop mid-word."""
    colour_coef: float = opt(0.0, ge=0)
    """Guard: - coef for a rewrite that changes a colour the user prompt gives something (data.colours: drops
    it, or colours the same thing otherwise: "a black dog" -> "a black dog with golden fur")."""
    max_query_tokens: int = opt(256, ge=8)
    eval_prompts: int = opt(64, ge=1)
    """Held-out low prompts (the SFT split's held-out pairs) scored with greedy decoding at each checkpoint."""
    prompt_reward_below: float | None = None
    """Train and evaluate only on pairs whose user prompt, taken as its own rewrite, scores below this reward: a
    prompt that already scores at the reward's ceiling leaves nothing to climb (the small preset's style reward
    saturates on stripped DiffusionDB prompts). None: every pair."""
    checkpoint_every: int = opt(100, ge=1)
    stop_after_step: int = opt(0, ge=0)
    """As sft.stop_after_step."""
    async_rollout: bool = False
    """Group methods: each worker's next iteration is sampled and scored by a rollout actor (a copy of the policy,
    sent the weights before each update) while the worker updates on this one: one update off-policy, as
    OpenRLHF's async training and verl's one-step-off-policy; hides generation and reward behind the update. The
    first iteration of a run (and of a resumed one) is sampled on-policy."""
    actor_cpus: float = opt(1.0, ge=0)
    """CPUs of each reference actor and each reward actor (learned or online; see workers_per_actor), and of each
    worker's rollout actor (async_rollout)."""
    actor_gpus: float = opt(0.0, ge=0)
    workers_per_actor: int = opt(0, ge=0)
    """Train workers per reference and per reward actor: each group of this many workers (by rank) gets its own
    reference and reward actor, ceil(num_workers / workers_per_actor) of each, so the workers do not queue behind
    one actor; 0: one reference and one reward actor for all the workers."""
    seed: int = 42
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    resources: TrainResources = field(default_factory=TrainResources)


@dataclass
class ControlsConfig:
    """What a user may ask of the endpoint's rewrites beyond the prompt (docs/serving.md, Controls)."""

    detail_low_max_words: int = opt(6, ge=0)
    """detail=low: at most this many words added to the user's prompt."""
    detail_high_min_words: int = opt(16, ge=1)
    """detail=high: at least this many words added (end of text and line breaks are held back until then)."""
    style_bias: float = opt(4.0, ge=0)
    """Added to the logits of the tokens that spell a requested style family's words."""
    max_keep: int = opt(8, ge=1)
    """Most protected spans (keep list and <keep> markup together) per request."""
    max_avoid: int = opt(64, ge=0)
    """Most avoid words per request."""
    reward_model: str = ""
    """`bp-ray train rm` folder behind rank=reward_model; empty: the run's rm output if it exists (else such
    requests get 400)."""
    online_rank: bool = False
    """Allows rank=online (render each candidate and score it): loads Stable Diffusion and the scorers in a
    deployment of their own."""
    online_seeds: int = opt(2, ge=1)
    """Seeds each candidate is rendered with for rank=online; its scores are their means."""
    candidate_store: str = ""
    """SQLite file of the candidates the endpoint returned (for edit_of); empty:
    <output_dir>/serve/candidates.sqlite."""
    store_max_rows: int = opt(100_000, ge=1)
    """The store keeps the newest this many candidates."""
    scorer_cpus: float = opt(0.5, ge=0)
    """The scoring deployment (learned reward models, and for online_rank Stable Diffusion and the scorers)."""
    scorer_gpus: float = opt(0.0, ge=0)


@dataclass
class DecodingConfig:
    """Repetition controls of the rewrites a model writes at inference (eval, eval-text, the endpoint's default);
    training samples never use them, so that PPO's log-probabilities are the policy's own."""

    repetition_penalty: float = opt(1.0, ge=1.0, le=2.0)
    """Above 1: a token the output already holds has its logit divided by this (multiplied if negative); 1: off."""
    no_repeat_ngram_size: int = opt(0, ge=0, le=16)
    """n > 0: no n tokens in a row occur twice in one output; 0: off. Only generated tokens count, so a rewrite may
    repeat the user's words."""
    keep_colours: bool = False
    """A prompt that gives something a colour ("a black dog") gets every other colour word banned from its
    rewrite at decoding (data.colours.other_colours): the model cannot write "a black dog with golden fur", and
    Stable Diffusion, which lets a colour named anywhere bleed onto the subject, is not offered one. A prompt
    without colours is rewritten as before. The endpoint takes it per request too (`keep_colours`)."""


@dataclass
class ServeConfig:
    """The beautifier endpoint on Ray Serve: batched generation, autoscaling, backpressure, validation."""

    model: str = ""
    """Checkpoint to serve (HF folder or id, or tiny:<role>); empty means the run's PPO output if it exists,
    else its SFT output, else models.policy."""
    model_name: str = "bp-ray-beautifier"
    """The id clients pass as `model` in OpenAI-style requests and that /v1/models lists."""
    host: str = "127.0.0.1"
    port: int = opt(8000, ge=1, le=65535)
    metrics_port: int = opt(0, ge=0, le=65535)
    """Where a local Ray started by `bp-ray serve` exports Prometheus metrics (Serve's own included); 0: a port
    Ray picks. A cluster's Ray sets its own (`ray start --metrics-export-port`)."""
    max_batch_size: int = opt(8, ge=1)
    """Rows (prompts x n) per generate call; 1 turns batching off."""
    batch_wait_timeout_s: float = opt(0.01, ge=0)
    """How long a batch waits for more rows once its first arrived: the rows that waited at the ingress's gate
    while the previous batch ran need a moment to reach the queue (measured: 0 s gave 2.7 rows per batch at 8
    clients, 0.01 s gave 6.9)."""
    stream_interval_s: float = opt(0.05, ge=0)
    """A streamed answer sends its first tokens at once, then what was generated in each interval as one event;
    0: an event per token. An event per token made a streamed request cost 5x the CPU of a plain one (proxy,
    ingress and client each handle every event); 20 events a second still reads as a live stream."""
    max_concurrent_batches: int = opt(1, ge=1)
    """Batches one ingress replica has at the generators at once. 1 fills batches best on one generator; set it
    to max_replicas so that autoscaling sees batches queue up."""
    min_replicas: int = opt(1, ge=0)
    """Generator replicas (the model), autoscaled between min_replicas and max_replicas."""
    max_replicas: int = opt(2, ge=1)
    target_ongoing_requests: float = opt(1.0, gt=0)
    """Batches in flight per generator replica that autoscaling aims for."""
    upscale_delay_s: float = opt(30.0, ge=0)
    """How long the generator must stay above target before Serve adds a replica (Serve's default). A new replica
    loads the model before it helps, so adding one for a burst shorter than this would only cost CPU or GPU
    while the burst is already ending."""
    downscale_delay_s: float = opt(600.0, ge=0)
    """How long the generator must stay below target before Serve removes a replica (Serve's default). A removed
    replica has to load the model again when traffic comes back, so lulls shorter than this keep it."""
    look_back_period_s: float = opt(30.0, gt=0)
    """Window over which Serve averages the batches in flight before comparing them with the target (Serve's
    default); keep it above metrics_interval_s. A short window follows load faster but also the gaps between
    batches."""
    metrics_interval_s: float = opt(10.0, gt=0)
    """How often the ingress reports its batches in flight to Serve's controller (Serve's default): scaling
    reacts no faster than this. Ray 2.60 marks the field deprecated and warns when it is not 10, but still uses
    it; the environment variables the warning names are not read yet."""
    num_cpus_per_replica: float = opt(1.0, ge=0)
    """Per generator replica; also its torch threads on CPU."""
    num_gpus_per_replica: float = opt(0.0, ge=0)
    ingress_replicas: int = opt(1, ge=1)
    """HTTP ingress replicas (validation and batching, no model)."""
    ingress_cpus: float = opt(0.5, ge=0)
    max_ongoing_requests: int = opt(16, ge=1)
    """Requests one ingress replica works on at once (its batches fill from these)."""
    max_queued_requests: int = opt(32, ge=-1)
    """Requests waiting for an ingress replica beyond max_ongoing_requests; more get HTTP 503 at once.
    -1: no limit."""
    request_timeout_s: float = opt(30.0, gt=0)
    """A request not answered within this time gets HTTP 504."""
    health_timeout_s: float = opt(10.0, gt=0)
    """How long GET /healthz waits for a generator replica (503 past it). Its own bound, not request_timeout_s:
    a liveness probe must not fail because generation is given a short time."""
    max_prompt_chars: int = opt(1000, ge=1)
    """Longest prompt (also: each stop string) in characters."""
    max_messages: int = opt(64, ge=1)
    """Most messages one chat request may carry. Only the last user message is beautified, but every message is
    parsed and checked, so an unbounded history would be unbounded work for the ingress."""
    max_chat_chars: int = opt(32768, ge=1)
    """Most characters of all of one chat request's messages together (system prompts and history included)."""
    max_body_bytes: int = opt(1_048_576, ge=1024)
    """Largest request body (by its Content-Length); a larger one gets 413 before it is read or parsed. The other
    limits bound what a valid request holds; this bounds what the ingress reads to find out."""
    max_new_tokens: int = opt(256, ge=1)
    """Upper limit a request may ask for."""
    default_max_new_tokens: int = opt(64, ge=1)
    default_temperature: float = opt(0.7, ge=0, le=2)
    top_p: float = opt(0.9, gt=0, le=1)
    max_n: int = opt(8, ge=1)
    """Most outputs one request may ask for (n)."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """Repetition controls of a request that does not set repetition_penalty / no_repeat_ngram_size itself."""
    enable_render: bool = False
    """Adds POST /v1/render: beautify, then render with Stable Diffusion (a second deployment)."""
    render: RenderConfig = field(default_factory=RenderConfig)
    render_cpus: float = opt(1.0, ge=0)
    render_gpus: float = opt(0.0, ge=0)
    controls: ControlsConfig = field(default_factory=ControlsConfig)


@dataclass
class EvalConfig:
    """Evaluation: rewrite, render and score held-out user prompts (paper Section 5)."""

    prompts: str = ""
    """JSON Lines / CSV / TSV file of user prompts; empty means the embedded evaluation set."""
    num_prompts: int = opt(0, ge=0)
    """Evaluate at most this many prompts; 0 means all."""
    systems: list[str] = field(default_factory=lambda: ["original", "tags", "sft", "ppo"])
    num_seeds: int = opt(4, ge=1)
    """Every rewritten prompt is rendered with seeds rewards.seed_base .. + num_seeds - 1."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """Paper: Stable Diffusion 1.5, 512x512, 20 steps, Euler ancestral; metrics against the raw prompt."""
    max_new_tokens: int = opt(256, ge=1)
    temperature: float = opt(0.0, ge=0)
    """Sampling temperature of the sft / ppo rewrites; 0 is greedy (each system's best guess)."""
    top_p: float = opt(1.0, gt=0, le=1)
    generation_seed: int = opt(0, ge=0)
    """Seed of prompt i's sampled rewrite is generation_seed + i (used only when temperature > 0)."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """Repetition controls of the sft / ppo / base rewrites."""
    batch_size: int = opt(16, ge=1)
    """Prompts per rewrite batch and per render request to the reward service."""
    num_tags: int = opt(5, ge=1)
    """The `tags` baseline appends this many of the most frequent style/quality tags of tags_source."""
    tags_source: str = ""
    """Prompt file whose tag frequencies pick the `tags` baseline's tags; empty means the embedded corpus."""
    llm_backend: str = opt("openai", choices=("openai", "local"))
    """`llm` system: an OpenAI-compatible endpoint (data.openai_* settings) or the local models.rewriter."""
    llm_instruction: str = (
        "Rewrite this short image description into a detailed Stable Diffusion prompt with subject, "
        "setting, style, artist and quality tags. Answer with the prompt only.\nDescription: {prompt}\nPrompt:"
    )
    grid_prompts: int = opt(8, ge=0)
    """Rows of the report's image grid: the first prompts, every seed."""
    human_prompts: int = opt(48, ge=0)
    """The first prompts whose images (every seed) are saved under images/ for the human side-by-side study
    (`bp-ray eval human`), beside the grid's."""
    text_prompts: list[str] = field(default_factory=list)
    """Prompt files `bp-ray eval-text` judges the rewrites of (empty: eval.prompts)."""
    text_num_prompts: int = opt(0, ge=0)
    """Prompts `bp-ray eval-text` draws from each file (eval.generation_seed), after leaving out every prompt the
    run's training pairs hold; 0 means all."""
    metrics: list[str] = field(default_factory=list)
    """Per-image metrics an installed backend registers, computed from every image's pixels beside the model
    scores: `world_truth` (the miniature world's true_aesthetic, colour_match, shape_match and count_match, judged
    by code; for the world preset, whose prompts describe world scenes)."""


@dataclass
class PipelineConfig:
    """Everything one bp-ray run needs."""

    preset: str = "tiny"
    output_dir: str = "runs/tiny"
    seed: int = 0
    models: ModelsConfig = field(default_factory=ModelsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=110)

    def hash(self, *sections: str) -> str:
        """Stable short hash of the whole config, or of the named sections only."""
        data = self.to_dict()
        if sections:
            data = {name: data[name] for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


EVAL_SYSTEMS = ("original", "tags", "sft", "ppo", "llm")


def attach_field_help(module_name: str) -> None:
    """Each field's docstring (the string literal right under it) in a module's dataclasses becomes its
    metadata["help"], so the help is read where the field is declared and shown by `bp-ray config explain`."""
    module = sys.modules[module_name]
    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        cls = getattr(module, node.name, None) if isinstance(node, ast.ClassDef) else None
        if not dataclasses.is_dataclass(cls):
            continue
        docs = {stmt.target.id: inspect.cleandoc(after.value.value)
                for stmt, after in zip(node.body, node.body[1:], strict=False)
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)}
        for f in dataclasses.fields(cls):
            if f.name in docs:
                f.metadata = types.MappingProxyType({**f.metadata, "help": docs[f.name]})


attach_field_help(__name__)
