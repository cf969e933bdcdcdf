"""A rewrite keeps the colours the user gave: the eval-text metric and the PPO guard share data.colours."""

from __future__ import annotations

import pytest

from bp_ray.data.colours import colour_bindings, colours_changed, other_colours


def test_a_prompt_binds_each_colour_to_the_word_it_colours():
    assert colour_bindings("A black colored dog.") == {"dog": {"black"}}
    assert colour_bindings("a red circle on top of a blue square") == {"circle": {"red"}, "square": {"blue"}}
    assert colour_bindings("a grey and golden cat") == {"cat": {"gray", "gold"}}
    assert colour_bindings("two green bottles") == {"bottle": {"green"}}
    assert colour_bindings("a portrait at golden hour") == {}
    assert colour_bindings("a cat on a sofa") == {}


@pytest.mark.parametrize(("prompt", "output"), [
    ("a yellow triangle", "a purple triangle, digital art"),                      # colour replaced (and dropped)
    ("A black colored dog.", "a black colored dog with golden fur, wearing a hat"),  # a `with` phrase recolours it
    ("A green colored banana.", "a green colored banana, with the vibrant colors of red and yellow on it"),
    ("a white cat", "a fluffy golden white cat, 8k"),                             # another colour right before it
    ("a red car and a blue house", "a red car next to a house, highly detailed"),  # blue dropped
])
def test_a_rewrite_that_recolours_what_the_user_coloured_changes_it(prompt, output):
    assert colours_changed(prompt, output) is True


@pytest.mark.parametrize(("prompt", "output"), [
    ("A black colored banana.", "a black colored banana rests on a white marble countertop"),  # colour elsewhere
    ("a red circle on top of a blue square", "a red circle on top of a blue square, glowing, 4k"),
    ("A black colored dog.", "a black dog at golden hour, by greg rutkowski"),     # light, not a colour
    ("two green bottles", "Two GREEN glass bottles with a cork, on a table. A blue sky outside."),
    ("a grey cat", "a gray cat, soft light"),                                     # the same colour spelt otherwise
])
def test_a_rewrite_that_adds_colours_elsewhere_keeps_them(prompt, output):
    assert colours_changed(prompt, output) is False


def test_a_prompt_without_colours_has_nothing_to_keep():
    assert colours_changed("a cat on a sofa", "a ginger cat on a red velvet sofa") is None


def test_the_colours_a_rewrite_may_not_add_are_all_but_the_users():
    others = other_colours("A black colored dog and a grey cat.")
    assert "golden" in others and "gold" in others and "white" in others
    assert not {"black", "grey", "gray"} & set(others)  # the user's colours, in either spelling
    assert other_colours("a cat on a sofa") == ()  # nothing given, nothing to keep
    assert other_colours("a portrait at golden hour") == ()
