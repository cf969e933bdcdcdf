"""User controls applied by the ingress (bp_ray/serve/controls.py): keep markup, protected spans, avoided phrases,
the added-word limit and the encoder token budget."""

from __future__ import annotations

import pytest

from bp_ray.data.vocab import load_vocab
from bp_ray.serve.controls import (
    STYLES,
    apply_keep,
    banned_phrases,
    default_avoid,
    encoder_tokens,
    finish_output,
    fit_budget,
    occurs,
    parse_keep,
    strip_avoided,
    style_phrases,
    trim_added_words,
)


def words_plus_two(text: str) -> int:
    """A stand-in encoder count: one token per word, plus BOS and EOS."""
    return len(text.split()) + 2


# --- parse_keep ---------------------------------------------------------------------------------------------------

def test_keep_markup_is_removed_and_its_spans_returned_in_order():
    clean, spans = parse_keep("a <keep>red hat</keep> on a <KEEP> cat, sitting </keep>!")
    assert clean == "a red hat on a  cat, sitting !"  # span text stays in place, spaces and all
    assert spans == ["red hat", "cat, sitting"]  # stripped; a comma inside a span is fine


def test_a_prompt_without_markup_comes_back_unchanged():
    assert parse_keep("a cat <on> a sofa") == ("a cat <on> a sofa", [])


def test_keep_markup_keeps_unicode_spans():
    assert parse_keep("ein <keep>Fuchs im Schnee ❄</keep>, Öl") == ("ein Fuchs im Schnee ❄, Öl", ["Fuchs im Schnee ❄"])


@pytest.mark.parametrize("prompt, message", [
    ("<keep>a <keep>b</keep></keep>", "<keep> at position 8 opens inside the span opened at position 0"),
    ("a cat</keep>", "</keep> at position 5 closes no open <keep>"),
    ("a <keep>cat", "<keep> at position 2 is never closed"),
    ("x <keep>  </keep>", "the <keep> span at position 2 is empty"),
    ("<keep></keep>", "the <keep> span at position 0 is empty"),
])
def test_bad_keep_markup_says_what_and_where(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_keep(prompt)


# --- apply_keep ---------------------------------------------------------------------------------------------------

def test_spans_already_in_the_text_leave_it_alone():
    assert apply_keep("a cat in a red hat, oil painting", ["red hat", "oil painting"]) == (
        "a cat in a red hat, oil painting")


def test_missing_spans_go_in_front_in_order():
    assert apply_keep("a cat, oil painting", ["red hat", "oil painting", "blue, green"]) == (
        "red hat, blue, green, a cat, oil painting")
    assert apply_keep("  ", ["red hat"]) == "red hat"


def test_spans_must_appear_verbatim_case_included():
    assert apply_keep("a Red Hat", ["red hat"]) == "red hat, a Red Hat"


# --- strip_avoided ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("a cat, 8k, trending on artstation, oil painting", "a cat, oil painting"),
    ("8k, a cat", "a cat"),
    ("a cat, 8k", "a cat"),
    ("a cat 8K photo", "a cat photo"),  # any case
    ("a cat, by Greg  Rutkowski.", "a cat."),  # the longest phrase wins; any spaces between its words
    ("a cat, (masterpiece:1.2), red", "a cat, red"),  # emptied weight brackets go too
    ("a cat, ((masterpiece)), red", "a cat, red"),
    ("a cat (red, 8k) b", "a cat (red) b"),
    ("a cat 8kHz", "a cat 8kHz"),  # whole words only
    ("a cat, 8k, 4k, hdr", "a cat"),
])
def test_avoided_phrases_are_removed_and_separators_tidied(text, expected):
    assert strip_avoided(text, default_avoid(), allowed=["a cat"]) == expected


def test_phrases_the_user_wrote_are_not_removed():
    # "masterpiece" is in the user's prompt: theirs to keep; "8k" is not.
    assert strip_avoided("a cat, 8k, masterpiece", default_avoid(), ["a masterpiece of a cat"]) == (
        "a cat, masterpiece")
    assert banned_phrases(["8k", "Masterpiece", " 8k "], ["a masterpiece of a cat"]) == ("8k",)


def test_nothing_inside_a_kept_span_is_touched():
    # The span "red hat 8k" holds "8k", so "8k" is the user's and stays everywhere; tidying never edits a span.
    assert strip_avoided("a red hat 8k, 8k", ["8k"], ["a cat", "red hat 8k"]) == "a red hat 8k, 8k"
    assert strip_avoided("red,  blue, 4k", ["4k"], ["red,  blue"]) == "red,  blue"


def test_phrases_match_as_whole_words_ignoring_case():
    assert occurs("8k", "an 8K photo") and not occurs("8k", "an 8kHz tone") and not occurs("art", "artstation")
    assert occurs("f/1.8", "shot at f/1.8, bokeh") and occurs("café", "CAFÉ noir")


# --- trim_added_words ---------------------------------------------------------------------------------------------

TEXT = "a cat, golden hour lighting, highly detailed oil painting"


@pytest.mark.parametrize("max_added, expected", [
    (7, TEXT),  # 2 prompt words + 7 = 9 = all of it
    (3, "a cat, golden hour lighting"),  # 5 words end on a comma
    (2, "a cat, golden hour"),  # no comma after "hour" that adds a word: cut after the last allowed word
    (0, "a cat"),
])
def test_added_words_are_cut_at_a_comma_else_a_word(max_added, expected):
    assert trim_added_words(TEXT, "a cat", max_added, []) == expected


def test_a_cut_at_a_comma_must_still_add_a_word():
    # The only comma before the limit comes right after the prompt: cutting there would add nothing.
    assert trim_added_words("a cat, highly detailed oil painting of the sky", "a cat", 2, []) == (
        "a cat, highly detailed")


def test_trimming_never_cuts_into_a_span():
    assert trim_added_words(TEXT, "a cat", 2, ["oil painting"]) == TEXT  # the span ends the text: all stays
    assert trim_added_words(TEXT, "a cat", 2, ["hour lighting, highly"]) == "a cat, golden hour lighting, highly"


# --- encoder_tokens and fit_budget ---------------------------------------------------------------------------------

def test_encoder_tokens_count_bos_and_eos_without_truncation():
    from bp_ray.models.tokenizers import CLIP_MAX_LENGTH, train_clip_tokenizer

    tokenizer = train_clip_tokenizer(["a cat on a sofa", "a dog in the park, oil painting"] * 5, 300)
    assert encoder_tokens(tokenizer, "a cat") == 4  # <|startoftext|> a cat <|endoftext|>
    assert encoder_tokens(tokenizer, "") == 2
    assert encoder_tokens(tokenizer, "a cat " * 60) == 122 > CLIP_MAX_LENGTH


@pytest.mark.parametrize("budget, expected", [
    (11, TEXT),  # 9 words + 2
    (7, "a cat, golden hour lighting"),  # whole comma segments first
    (4, "a cat"),
    (3, "a"),  # then words
    (2, None),  # nothing non-empty fits
])
def test_the_budget_drops_trailing_segments_then_words(budget, expected):
    assert fit_budget(TEXT, [], words_plus_two, budget) == expected


def test_the_budget_never_drops_a_span_and_gives_up_when_spans_do_not_fit():
    spans = ["hour lighting, highly"]
    assert fit_budget(TEXT, spans, words_plus_two, 9) == "a cat, golden hour lighting, highly detailed"
    assert fit_budget(TEXT, spans, words_plus_two, 8) == "a cat, golden hour lighting, highly"
    assert fit_budget(TEXT, spans, words_plus_two, 7) is None  # what precedes the span is not trailing
    assert fit_budget(TEXT, ["oil painting"], words_plus_two, 10) is None


# --- finish_output ------------------------------------------------------------------------------------------------

def test_finish_output_keeps_every_promise_and_reports_the_token_count():
    text = "golden hour, 8k, highly detailed, oil painting, bokeh"
    # strip 8k and highly detailed -> put "a cat" in front -> 2 + 4 words: cut at the comma after "painting"
    assert finish_output(text, "a cat", ["a cat"], default_avoid(), 4, words_plus_two, 10) == (
        "a cat, golden hour, oil painting", 8)
    # no word limit, a tighter budget
    assert finish_output(text, "a cat", ["a cat"], default_avoid(), None, words_plus_two, 6) == (
        "a cat, golden hour", 6)


def test_finish_output_refuses_what_cannot_be_fixed():
    assert finish_output("8k, 4k", "a cat", [], default_avoid(), None, words_plus_two, 77) is None  # nothing left
    # the spans alone take 5 words + 2 > 6
    assert finish_output("a cat", "a cat", ["a very long kept span"], [], None, words_plus_two, 6) is None
    assert finish_output("a cat, oil painting", "a cat", [], [], None, lambda _: 99, 77) is None


def test_finish_output_keeps_the_users_own_avoided_words():
    assert finish_output("a masterpiece of a cat, 8k, masterpiece", "a masterpiece of a cat", [], default_avoid(),
                         None, words_plus_two, 77) == ("a masterpiece of a cat, masterpiece", 8)


# --- vocabulary ---------------------------------------------------------------------------------------------------

def test_style_families_and_the_default_avoid_list_come_from_the_vocabulary():
    vocab = load_vocab()
    assert STYLES == ("photo", "painting", "anime", "3d")
    for style in STYLES:
        assert 10 <= len(style_phrases(style)) <= 20
    assert "bokeh" in style_phrases("photo") and "trending on artstation" in default_avoid()
    assert 15 <= len(vocab.overused_terms) <= 30
    # A style must be able to add its words: none is on the default avoid list (load_vocab checks it too).
    assert not {p.lower() for s in STYLES for p in style_phrases(s)} & {t.lower() for t in default_avoid()}
    with pytest.raises(ValueError, match="unknown style 'sketch': choose one of photo, painting, anime, 3d"):
        style_phrases("sketch")


def test_a_late_span_moves_to_the_front_when_the_budget_cannot_cut_before_it():
    text = "golden hour, oil painting, <lora:x>"
    assert fit_budget(text, ["<lora:x>"], words_plus_two, 5) is None
    assert finish_output(text, "a cat", ["<lora:x>"], [], None, words_plus_two, 5) == ("<lora:x>, golden hour", 5)


def test_without_spans_a_first_word_over_the_budget_is_cut_inside():
    def chars(text: str) -> int:
        return len(text)

    assert fit_budget("abcdefghij, more", [], chars, 4) == "abcd"
    assert finish_output("abcdefghij more", "x", [], [], None, chars, 6) == ("abcdef", 6)


def test_keep_colours_bans_the_other_colours_by_default_or_when_a_request_asks():
    from bp_ray.config import ControlsConfig
    from bp_ray.serve import schemas as S
    from bp_ray.serve.control_plan import plan_controls, used_controls

    def banned(body: S.Controls, default: bool, prompt: str = "A black colored dog.") -> tuple[str, ...]:
        return plan_controls(body, prompt, ControlsConfig(), None, words_plus_two, False,
                             keep_colours=default)[1].avoid_words

    assert "golden" in banned(S.Controls(), True) and "black" not in banned(S.Controls(), True)
    assert banned(S.Controls(), False) == ()
    assert "golden" in banned(S.Controls(keep_colours=True), False)
    assert banned(S.Controls(keep_colours=False), True) == ()
    assert banned(S.Controls(), True, "a cat on a sofa") == ()  # the user gave no colour
    assert used_controls(S.Controls(keep_colours=True)) == []  # decoding alone keeps it: a stream may ask
