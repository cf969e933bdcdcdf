"""Prompts over CLIP's 77 tokens with the tiny SD: token counts, chunked embeddings, renders, cache key."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bp_ray.config_loader import load_config
from bp_ray.models.loading import load_diffusion
from bp_ray.rewards.cache import RenderKey
from bp_ray.rewards.labeler import RewardSetup, make_render_key, model_fingerprint
from bp_ray.rewards.long_prompts import chunked_prompt_embeds, token_lengths
from bp_ray.rewards.render import render_seeds


def labelling(cfg) -> RewardSetup:
    """What labelling with this config renders and scores."""
    return RewardSetup.for_labels(cfg.data, cfg.rewards, cfg.models)

pytestmark = pytest.mark.integration

SHORT = "a cat on a sofa, oil painting"
HEAD = ("a portrait of an old fisherman in a wooden boat on a stormy sea, dramatic lighting, oil painting, "
        "highly detailed, by rembrandt, trending on artstation, golden hour, cinematic, 8k, sharp focus, "
        "intricate, elegant, volumetric fog, concept art, matte painting, rich colors, soft shadows")
# two endings of the same long prompt: they differ only after HEAD, i.e. past the 77-token window
LONG_A = HEAD + ", a lighthouse on the cliff, seagulls in the sky, waves crashing on the rocks, moonlight"
LONG_B = HEAD + ", red castle, blue sky, a dragon made of fire, green forest, a small cat, autumn leaves"
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def pipe(tiny_models_cfg):
    return load_diffusion(tiny_models_cfg.diffusion, tiny_models_cfg, device="cpu", scheduler="ddim")


def render_cfg(long_prompts: str):
    # the tiny preset's render settings: 32x32, 4 DDIM steps, guidance 7.5
    return dataclasses.replace(load_config("tiny").data.render, long_prompts=long_prompts)


def test_token_lengths_count_bos_and_eos_without_truncation(pipe):
    tokenizer = pipe.tokenizer
    short, head, long_a, long_b = token_lengths(tokenizer, [SHORT, HEAD, LONG_A, LONG_B])
    assert short == len(tokenizer.tokenize(SHORT)) + 2  # + BOS + EOS
    assert short <= tokenizer.model_max_length
    # HEAD alone (85 tokens) fills more than the first window: the endings start past content token 80
    assert head - 2 >= 80
    assert 100 < long_a <= 150 and 100 < long_b <= 150
    assert long_a == len(tokenizer.tokenize(LONG_A)) + 2
    assert token_lengths(tokenizer, []) == []


def test_short_prompts_get_exactly_the_pipelines_embeddings_and_images(pipe):
    prompts = [SHORT, "an old lighthouse at sunset"]
    embeds, negative = chunked_prompt_embeds(pipe, prompts)
    expected, expected_negative = pipe.encode_prompt(prompts, "cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=True)
    assert embeds.shape == (2, 77, pipe.text_encoder.config.hidden_size)
    assert torch.equal(embeds, expected) and torch.equal(negative, expected_negative)
    truncated = render_seeds(pipe, prompts, SEEDS, render_cfg("truncate"))
    chunked = render_seeds(pipe, prompts, SEEDS, render_cfg("chunked"))
    assert truncated.shape == chunked.shape == (2, 2, 32, 32, 3)
    assert np.array_equal(truncated, chunked)


def test_long_prompts_are_two_windows_whose_first_is_the_truncated_encoding(pipe):
    embeds, negative = chunked_prompt_embeds(pipe, [SHORT, LONG_A])
    truncated, _ = pipe.encode_prompt([LONG_A], "cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    # 122 tokens = BOS + 120 + EOS -> 2 windows of 75 content tokens; the short prompt and negative padded to 2
    assert embeds.shape == negative.shape == (2, 2 * 77, pipe.text_encoder.config.hidden_size)
    assert torch.equal(embeds[1, :77], truncated[0])
    empty_window = negative[0, :77]
    assert torch.equal(embeds[0, 77:], empty_window) and torch.equal(negative[0, 77:], empty_window)


def test_words_past_the_first_window_change_the_image_only_when_chunked(pipe):
    truncated = render_seeds(pipe, [LONG_A, LONG_B], SEEDS, render_cfg("truncate"))
    # the text encoder sees BOS + the first 75 tokens + EOS, identical for both endings
    assert np.array_equal(truncated[0], truncated[1])
    chunked = render_seeds(pipe, [LONG_A, LONG_B], SEEDS, render_cfg("chunked"))
    assert not np.array_equal(chunked[0], chunked[1])
    assert not np.array_equal(chunked[0], truncated[0])  # the second window steers the image


def test_a_short_prompt_renders_alike_beside_a_long_one_when_chunked(pipe):
    chunked = render_cfg("chunked")
    mixed = render_seeds(pipe, [LONG_A, SHORT], SEEDS, chunked)
    assert mixed.shape == (2, 2, 32, 32, 3) and mixed.dtype == np.uint8
    # prompts of different window counts get separate calls: no empty window is appended to the short one
    assert np.array_equal(mixed[1], render_seeds(pipe, [SHORT], SEEDS, chunked)[0])
    assert np.array_equal(mixed[0], render_seeds(pipe, [LONG_A], SEEDS, chunked)[0])
    assert render_seeds(pipe, [], SEEDS, chunked).shape == (0, 2, 32, 32, 3)


def test_chunked_renders_get_their_own_cache_key_and_the_default_key_is_unchanged(tiny_models_cfg):
    zoo = f"models.zoo_dir={tiny_models_cfg.zoo_dir}"
    default = make_render_key(labelling(load_config("tiny", [zoo])))
    chunked = make_render_key(labelling(load_config("tiny", [zoo, "data.render.long_prompts=chunked"])))
    models, render = tiny_models_cfg, load_config("tiny").data.render
    # the key as built before long_prompts existed: default-mode caches stay valid
    before = RenderKey(diffusion_model=model_fingerprint(models.diffusion, models), height=render.height,
                       width=render.width, num_inference_steps=render.num_inference_steps,
                       guidance_scale=render.guidance_scale, scheduler=render.scheduler,
                       pickscore_model=model_fingerprint(models.pickscore, models) + "|" + models.pickscore_processor,
                       aesthetic_model=model_fingerprint(models.aesthetic, models),
                       relevance_model=model_fingerprint(models.clip_relevance, models))
    assert default == before and default.digest() == before.digest()
    assert chunked.digest() != default.digest()
    assert chunked == dataclasses.replace(default, diffusion_model=default.diffusion_model + "|long=chunked")


NEGATIVE = "blurry, low quality, watermark"


@pytest.mark.parametrize("mode", ["truncate", "chunked"])
def test_a_negative_prompt_steers_the_image_and_none_is_diffusers_empty_default(pipe, mode):
    prompts = [SHORT, LONG_A]
    plain = render_seeds(pipe, prompts, SEEDS, render_cfg(mode))
    assert np.array_equal(render_seeds(pipe, prompts, SEEDS, render_cfg(mode), negative_prompt=None), plain)
    # the empty negative, passed explicitly, is what diffusers uses without one
    assert np.array_equal(render_seeds(pipe, prompts, SEEDS, render_cfg(mode), negative_prompt=""), plain)
    negative = render_seeds(pipe, prompts, SEEDS, render_cfg(mode), negative_prompt=NEGATIVE)
    assert negative.shape == plain.shape
    assert not np.array_equal(negative[0], plain[0]) and not np.array_equal(negative[1], plain[1])


def test_short_prompts_with_a_negative_render_alike_in_both_modes(pipe):
    prompts = [SHORT, "an old lighthouse at sunset"]
    embeds, negative = chunked_prompt_embeds(pipe, prompts, NEGATIVE)
    expected, expected_negative = pipe.encode_prompt(prompts, "cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=True,
                                                     negative_prompt=[NEGATIVE] * 2)
    assert torch.equal(embeds, expected) and torch.equal(negative, expected_negative)
    assert np.array_equal(render_seeds(pipe, prompts, SEEDS, render_cfg("truncate"), negative_prompt=NEGATIVE),
                          render_seeds(pipe, prompts, SEEDS, render_cfg("chunked"), negative_prompt=NEGATIVE))


def test_a_long_negative_gets_its_windows_and_pads_the_prompts_when_chunked(pipe):
    embeds, negative = chunked_prompt_embeds(pipe, [SHORT], LONG_A)
    # the negative needs 2 windows: the short prompt gets an empty second window, the negative its own two
    assert embeds.shape == negative.shape == (1, 2 * 77, pipe.text_encoder.config.hidden_size)
    alone, _ = chunked_prompt_embeds(pipe, [SHORT])
    assert torch.equal(embeds[:, :77], alone)
    truncated, _ = pipe.encode_prompt([LONG_A], "cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    assert torch.equal(negative[0, :77], truncated[0])
    # words of the negative past token 75 reach the image only when chunked
    chunked = render_cfg("chunked")
    a = render_seeds(pipe, [SHORT], SEEDS, chunked, negative_prompt=LONG_A)
    b = render_seeds(pipe, [SHORT], SEEDS, chunked, negative_prompt=LONG_B)
    assert not np.array_equal(a, b)
    truncate = render_cfg("truncate")
    assert np.array_equal(render_seeds(pipe, [SHORT], SEEDS, truncate, negative_prompt=LONG_A),
                          render_seeds(pipe, [SHORT], SEEDS, truncate, negative_prompt=LONG_B))
