"""The controls on the trained world beautifier (the shipped world zoo, no Ray, no HTTP): every output keeps every
protected span and fits the token budget, and the avoided words never appear, across many seeds."""

from __future__ import annotations

import re

import pytest
import torch

from bp_ray.config_loader import load_config
from bp_ray.data.colours import other_colours
from bp_ray.models.loading import load_causal_lm, resolve_model
from bp_ray.serve import schemas as S
from bp_ray.serve.control_plan import plan_controls
from bp_ray.serve.controls import encoder_tokens, occurs
from bp_ray.serve.generation import GenerationRequest, beautified_text, beautify_input, generate

pytestmark = pytest.mark.integration

PROMPTS = ("a yellow triangle", "a red circle above a blue square", "a green star", "two purple circles")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer

    cfg = load_config("world", [f"models.zoo_dir={tmp_path_factory.mktemp('world-zoo')}"])
    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(resolve_model(cfg.models.policy, cfg.models), cfg.models, device="cpu")
    encoder = AutoTokenizer.from_pretrained(resolve_model(cfg.models.diffusion, cfg.models), subfolder="tokenizer")
    return cfg, model, tokenizer, encoder


def rewrites(world, body: S.Controls, prompt: str, n: int = 16) -> list[tuple[str, int] | None]:
    cfg, model, tokenizer, encoder = world
    count = lambda text: encoder_tokens(encoder, text)  # noqa: E731
    plain, plan = plan_controls(body, prompt, cfg.serve.controls, int(encoder.model_max_length), count,
                                cfg.sft.keep_prompt)
    request = plan.constrain(GenerationRequest(
        beautify_input(cfg.sft.instruction, plain, cfg.sft.keep_prompt), n=n, max_new_tokens=48, temperature=1.0,
        top_p=0.9, seed=17, stop=("\n",), prompt=plain))
    result = generate(model, tokenizer, [request])[0]
    return [plan.finish(beautified_text(c.text, plain, cfg.sft.keep_prompt), plain, count) for c in result.completions]


def test_world_rewrites_keep_every_span_within_the_budget(world):
    spans = ["<lora:shapes:0.7>", "flat colours"]
    checked = 0
    for prompt in PROMPTS:
        for budget in (40, None):
            body = S.Controls(keep=spans, max_prompt_tokens=budget)
            for output in rewrites(world, body, f"<keep>{prompt}</keep>"):
                assert output is not None  # spans and prompt take at most 30 tokens here: nothing needs rejecting
                text, tokens = output
                assert prompt in text and all(span in text for span in spans), text
                assert tokens == encoder_tokens(world[3], text) <= (budget or 77)
                checked += 1
    assert checked == 128


def test_world_rewrites_never_add_an_avoided_word(world):
    # Words the world beautifier does add, so that banning them can fail.
    plain = [text for prompt in PROMPTS for text, _ in filter(None, rewrites(world, S.Controls(avoid=[]), prompt))]
    added = {word for text in plain for word in text.split()[3:] if word.isalpha()}
    frequent = sorted(added, key=lambda w: -sum(occurs(w, text) for text in plain))[:4]
    assert sum(any(occurs(w, text) for w in frequent) for text in plain) >= 8
    for prompt in PROMPTS:
        for output in rewrites(world, S.Controls(avoid=frequent), prompt):
            assert output is not None
            assert not [w for w in frequent if occurs(w, output[0]) and not occurs(w, prompt)], output


def test_keep_colours_leaves_every_other_colour_out_of_the_world_rewrites(world):
    def other_colour_outputs(body: S.Controls) -> int:
        found = 0
        for prompt in PROMPTS:
            others = set(other_colours(prompt))
            for output in filter(None, rewrites(world, body, prompt)):
                found += bool(others & set(re.findall(r"[a-z]+", output[0].lower())))
        return found

    # The world beautifier writes "orange and red color scheme" after "a yellow triangle"
    assert other_colour_outputs(S.Controls(avoid=[])) >= 8
    assert other_colour_outputs(S.Controls(avoid=[], keep_colours=True)) == 0
