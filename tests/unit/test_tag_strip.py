"""Pair source (iv): a plain prompt from a beautiful one by removing vocabulary tags and artist credits."""

from __future__ import annotations

import pytest

from bp_ray.data.prompt_rules import normalize_prompt
from bp_ray.data.tag_strip import strip_tags
from bp_ray.data.vocab import load_vocab, tag_terms

TERMS = tag_terms(load_vocab())


@pytest.mark.parametrize(("prompt", "plain"), [
    ("portrait of a knight in armor, highly detailed, digital painting, artstation, by greg rutkowski",
     "portrait of a knight in armor"),
    # an article may start the subject; connectors a removed tag leaves at either end go
    ("a highly detailed castle on a hill, 8k", "a castle on a hill"),
    ("ogre warrior holding an axe in the style of warhammer fantasy", "ogre warrior holding an axe"),
    ("a cat by a river, oil painting", "a cat by a river"),  # "by a river" is no artist credit
    ("a fox, concept art by jane doe, a forest at dawn, golden hour, a third thing", "a fox, a forest at dawn"),
    ("young girl | black military uniform | trending on pixiv", "young girl, black military uniform"),
    ("art by satoshi yamada, artstation, 8k", ""),  # nothing but tags
    ("A Cat On A Sofa, Oil Painting", "A Cat On A Sofa"),  # case kept
])
def test_strip_tags_keeps_what_the_prompt_depicts(prompt, plain):
    assert strip_tags(normalize_prompt(prompt), TERMS) == plain


def test_max_segments_bounds_the_plain_prompt():
    prompt = "a red barn, a green field, a blue sky, golden hour, 4k"
    assert strip_tags(prompt, TERMS, max_segments=1) == "a red barn"
    assert strip_tags(prompt, TERMS, max_segments=3) == "a red barn, a green field, a blue sky"


def test_every_kept_word_was_in_the_prompt_and_no_vocabulary_tag_is_left():
    prompts = ["a lighthouse on a cliff at night, dramatic lighting, octane render, unreal engine, by artgerm",
               "beautiful portrait of an old fisherman, sharp focus, cinematic, trending on artstation",
               "a bowl of ramen, oil painting, 4k, dramatic lighting"]
    for prompt in prompts:
        plain = strip_tags(prompt, TERMS)
        assert plain and set(plain.replace(",", " ").split()) <= set(prompt.replace(",", " ").split())
        lowered = f" {plain.lower()} "
        assert not [t for t in TERMS if len(t) > 3 and f" {t} " in lowered], plain
