"""Config: presets load, overrides convert to the declared type, bad input is a clear ConfigError."""

from __future__ import annotations

import pytest

from bp_ray.config import PAPER_INSTRUCTION, ConfigError, PipelineConfig
from bp_ray.config_loader import available_presets, load_config


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_loads_and_validates(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    assert "{raw}" in cfg.sft.instruction


def test_presets_are_tiny_and_paper():
    assert {"tiny", "paper"} <= set(available_presets())


def test_paper_preset_carries_the_papers_settings():
    cfg = load_config("paper")
    assert cfg.models.policy == "bigscience/bloom-1b1"
    assert cfg.sft.instruction == PAPER_INSTRUCTION
    assert (cfg.sft.lr, cfg.sft.batch_size, cfg.sft.epochs, cfg.sft.max_length) == (2e-5, 16, 4, 384)
    assert (cfg.sft.lr_scheduler, cfg.sft.warmup_ratio, cfg.sft.weight_decay) == ("cosine", 0.03, 0.0)
    assert (cfg.sft.deepspeed.zero_stage, cfg.sft.deepspeed.precision) == (2, "bf16")
    assert (cfg.rm.lr, cfg.rm.batch_size, cfg.rm.epochs) == (1e-5, 16, 1)
    assert (cfg.rm.aesthetic_input, cfg.rm.pickscore_input) == ("high", "low+high")
    ppo = cfg.ppo
    assert (ppo.lr, ppo.init_kl_coef, ppo.kl_target, ppo.kl_horizon) == (5e-6, 0.05, 6, 10000)
    assert (ppo.ppo_epochs, ppo.gamma, ppo.lam, ppo.clip_range, ppo.clip_range_value, ppo.vf_coef) == (
        4, 1.0, 0.95, 0.2, 0.2, 0.5)
    assert ppo.max_new_tokens == 256 and ppo.reward_baseline == "reference"
    assert cfg.rewards.alpha == 0.7
    assert cfg.data.num_seeds == 8
    render = cfg.eval.render
    assert (render.height, render.width, render.num_inference_steps, render.scheduler) == (
        512, 512, 20, "euler_ancestral")
    assert cfg.models.diffusion == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.sft.resources.use_gpu


def test_tiny_preset_uses_only_the_local_zoo():
    cfg = load_config("tiny")
    roles = ("policy", "rewriter", "rm_backbone", "captioner", "diffusion", "pickscore", "aesthetic",
             "clip_relevance")
    assert all(getattr(cfg.models, role).startswith("tiny:") for role in roles)
    assert cfg.models.device == "cpu"


def test_overrides_convert_to_declared_types():
    cfg = load_config("tiny", ["ppo.kl_target=6", "data.num_seeds=4", "sft.lr=1e-5",
                               "eval.systems=original,sft", "rewards.fused=true", "sft.deepspeed.zero_stage=3"])
    assert cfg.ppo.kl_target == 6.0 and isinstance(cfg.ppo.kl_target, float)
    assert cfg.data.num_seeds == 4
    assert cfg.sft.lr == 1e-5  # YAML 1.1 reads "1e-5" as a string; the float field still gets a float
    assert cfg.eval.systems == ["original", "sft"]
    assert cfg.rewards.fused is True
    assert cfg.sft.deepspeed.zero_stage == 3


def test_optional_field_accepts_null():
    assert load_config("tiny", ["ppo.kl_target=null"]).ppo.kl_target is None


def test_later_override_wins():
    assert load_config("tiny", ["data.num_seeds=3", "data.num_seeds=5"]).data.num_seeds == 5


@pytest.mark.parametrize(("override", "message"), [
    (["ppo.kl_targt=6"], "unknown config key 'ppo.kl_targt' (did you mean 'kl_target'?)"),
    (["nosuch.key=1"], "unknown config key 'nosuch'"),
    (["data.num_seeds=four"], "data.num_seeds expects an integer, got 'four'"),
    (["data.num_seeds=2.5"], "data.num_seeds expects an integer"),
    (["rewards.fused=maybe"], "rewards.fused expects true or false"),
    (["rewards.alpha=1.5"], "rewards.alpha=1.5 must be <= 1"),
    (["data.num_seeds=0"], "data.num_seeds=0 must be >= 1"),
    (["sft.lr=0"], "sft.lr=0.0 must be > 0"),
    (["sft.deepspeed.precision=fp8"], "choose one of: fp32, bf16, fp16"),
    (["rm.heads=three"], "rm.heads='three' is not allowed; choose one of: two_models, shared_backbone"),
    (["sft=1"], "sft is a section, not a value"),
    (["sft.lr.x=1"], "sft.lr is a value, not a section"),
    (["data.num_seeds"], "must look like section.key=value"),
    (["serve.min_replicas=3", "serve.max_replicas=2"], "serve.min_replicas=3 exceeds serve.max_replicas=2"),
    (["data.render.height=100"], "multiples of 8"),
    (["sft.instruction=no placeholder"], "must contain the placeholder {raw}"),
    (["eval.systems=original,gpt9"], "unknown system(s) gpt9; choose from: original, tags, sft, ppo, llm"),
    (["ppo.minibatch_size=64", "ppo.rollout_batch_size=16"], "ppo.minibatch_size=64 exceeds"),
    (["ppo.deepspeed.zero_stage=3"], "ppo.deepspeed.zero_stage=3 is not supported"),
    (["ppo.resources.num_workers=3"], "must be multiples of ppo.resources.num_workers=3"),
    (["ppo.minibatch_size=6"], "ppo.rollout_batch_size=16 must be a multiple of ppo.minibatch_size=6"),
    (["ppo.async_rollout=true"], "ppo.async_rollout needs a critic-free method"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", override)
    assert message in str(info.value)


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError,
                       match=r"unknown preset 'huge'; available presets: paper, paper-shapes, small, tiny, world$"):
        load_config("huge")


def test_config_file_layers_like_a_preset(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("preset: mine\ndata:\n  num_seeds: 3\n  render: {height: 64}\n")
    cfg = load_config(config_file=path, overrides=["data.render.width=128"])
    assert (cfg.preset, cfg.data.num_seeds, cfg.data.render.height, cfg.data.render.width) == ("mine", 3, 64, 128)
    assert cfg.ppo.kl_target == PipelineConfig().ppo.kl_target  # untouched sections keep their defaults


def test_config_file_errors_are_clear(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(config_file=bad_yaml)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(config_file=not_mapping)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(config_file=tmp_path / "missing.yaml")


def test_yaml_round_trip_preserves_everything(tmp_path):
    cfg = load_config("paper", ["ppo.kl_target=null", "eval.systems=original,llm"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(config_file=path)
    assert again.to_dict() == cfg.to_dict()
    assert again.hash() == cfg.hash()


def test_hash_of_sections_ignores_other_sections():
    base = load_config("tiny")
    changed = load_config("tiny", ["ppo.lr=0.5"])
    assert base.hash("data", "rewards") == changed.hash("data", "rewards")
    assert base.hash("ppo") != changed.hash("ppo")


def test_a_preset_names_prompt_pools_through_an_environment_variable(monkeypatch, tmp_path):
    """No preset points at ../shared: the small preset's pools live in $BP_RAY_PROMPTS, and a file that names an
    unset variable says which one when it is opened."""
    from bp_ray.config_loader import available_presets, preset_text
    from bp_ray.data.prompt_io import read_prompts

    assert not [p for p in available_presets() if "../shared" in preset_text(p)]
    monkeypatch.setenv("BP_RAY_PROMPTS", str(tmp_path))
    cfg = load_config("small")
    assert cfg.data.source == f"{tmp_path}/diffusiondb_imagereward_refl.jsonl"
    assert cfg.eval.text_prompts[0] == f"{tmp_path}/partiprompts.jsonl"
    monkeypatch.delenv("BP_RAY_PROMPTS")
    source = load_config("small").data.source
    assert source == "${BP_RAY_PROMPTS}/diffusiondb_imagereward_refl.jsonl"
    with pytest.raises(FileNotFoundError, match="environment variable BP_RAY_PROMPTS, which is not set"):
        read_prompts(source)


def test_explain_shows_a_keys_value_default_rules_and_the_help_written_under_its_field():
    from bp_ray.config_loader import explain

    text = explain(load_config("world"), "ppo.relevance_coef")
    assert text.splitlines()[:2] == ["ppo.relevance_coef = 10.0   (default 0.0)", "  type: float; >= 0"]
    assert "Guard: + coef x CLIP similarity" in text
    assert "one of two_models, shared_backbone" in explain(load_config("tiny"), "rm.heads")
    # a field SFT inherits from the training base keeps its help
    assert "Global batch size" in explain(load_config("tiny"), "rm.batch_size")
    section = explain(load_config("tiny"), "sft").splitlines()
    assert section[0].startswith("sft: Supervised fine-tuning") and "  keep_prompt = False  # The beautifier's" in \
        "\n".join(section)
    with pytest.raises(ConfigError, match="did you mean 'relevance_coef'"):
        explain(load_config("tiny"), "ppo.relevanc")
