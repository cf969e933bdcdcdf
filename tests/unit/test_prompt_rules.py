"""Prompt rules: normalisation, drop reasons, features, the low / high split, content filters, dedup keys."""

import math
from pathlib import Path

import pandas as pd
import pytest

from bp_ray.config import DataConfig
from bp_ray.config_loader import load_config
from bp_ray.data.corpus import generate_prompts
from bp_ray.data.prompt_io import read_prompts
from bp_ray.data.prompt_rules import (
    ANNOTATION_COLUMNS,
    DROP_EMPTY,
    DROP_NON_TEXT,
    DROP_TOO_LONG,
    HIGH,
    LOW,
    NEITHER,
    PromptFeatures,
    SplitRules,
    annotate_prompts,
    answer_text,
    classify,
    content_flag,
    dedup_key,
    drop_reason,
    keyword_hit,
    normalize_prompt,
    nsfw_score_flag,
    prompt_features,
    within_bounds,
    word_count,
)
from bp_ray.data.vocab import load_vocab, tag_terms

PROMPTS_DIR = Path("/work/shared/data/prompts")
DISCORD = PROMPTS_DIR / "sd_discord_prompts_sample20k.jsonl"
PARTI = PROMPTS_DIR / "partiprompts.jsonl"
RULES = SplitRules()  # DataConfig defaults: low <= 12 words, 0 tags, 2 segments; high >= 8 words and 2 tags / 4 segs
TERMS = tag_terms(load_vocab())
WEIRD = [
    "", " ", "\t\n", "\u3000", "\x00", "\x00\x07\x1b[31m", "(((", ")))", "((:1.2))", "(:)", ":1.2", "::", "--no",
    "--no --no", "Negative prompt:", "negative prompt: (blurry:1.3", "🔥" * 50, "(masterpiece:1.3", "[[[{{{", "\\(",
    "a" * 5000, "\u0301", "\ud800 lone surrogate", "(" * 3000 + "a:1.2" + ")" * 3000, "((a:1):1)" * 500,
    "by", "by ,", "art by", ", by", "16:9", "(16:9)", "::2", "cat::2.5.5", "\\", "()" * 100, "\r\n\r\n",
]


def features(raw: str, mode: str = "strip") -> PromptFeatures:
    return prompt_features(raw, normalize_prompt(raw, mode), TERMS)


# --- normalisation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    ("(highly detailed:1.2)", "highly detailed"),
    ("((masterpiece))", "masterpiece"),
    ("[blurry]", "blurry"),
    ("{castle}", "castle"),
    ("( highly detailed : 1.2 ), a cat", "highly detailed, a cat"),
    ("((a cat:1.2) on a sofa:1.1)", "a cat on a sofa"),  # nested: inner weight, then outer weight
    ("(masterpiece:1.3, a cat, 8k", "masterpiece, a cat, 8k"),  # unbalanced: ":1.3" and the stray "(" go
    ("a cat, ((( sharp focus ))", "a cat, sharp focus"),
    ("[a cat, sharp focus", "a cat, sharp focus"),
    ("a cat::2 dog", "a cat dog"),  # Midjourney weight
    ("a cat(fluffy)", "a cat fluffy"),  # a bracket becomes a space, so words do not merge
    ("\\(cat\\)", "cat"),  # A1111 escaped literal brackets
    ("16:9 poster at 12:30, (16:9)", "16:9 poster at 12:30, 16:9"),  # digit before ":" -> not a weight
    ("step 1: a cat", "step 1: a cat"),
])
def test_strip_mode_removes_every_weight_form(raw: str, expected: str):
    assert normalize_prompt(raw, "strip") == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("( highly detailed : 1.2 )", "(highly detailed:1.2)"),
    ("(highly detailed:1.2)", "(highly detailed:1.2)"),
    ("((masterpiece))", "((masterpiece))"),
    ("[ blurry ]", "[blurry]"),
    ("{castle}", "{castle}"),
    ("(a cat:1.25),   [blurry]", "(a cat:1.25), [blurry]"),
    ("(masterpiece:1.3, a cat", "(masterpiece:1.3, a cat"),  # unbalanced is left as written
])
def test_keep_mode_only_canonicalises_whitespace(raw: str, expected: str):
    assert normalize_prompt(raw, "keep") == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("a cat --no text, watermark", "a cat"),
    ("a cat, sharp focus Negative prompt: blurry, ugly", "a cat, sharp focus"),
    ("a cat\nNEGATIVE PROMPT: blurry", "a cat"),  # A1111 puts it on its own line; any case
    ("--no text", ""),
    ("a dog, no text", "a dog, no text"),  # plain "no" is not the flag
    ("a cat --nosy", "a cat --nosy"),  # "--nosy" is not "--no"
    ("a cat--no", "a cat--no"),  # the flag needs whitespace before it
])
def test_negative_part_is_removed_in_both_modes(raw: str, expected: str):
    assert normalize_prompt(raw, "strip") == expected
    assert normalize_prompt(raw, "keep") == expected


def test_whitespace_and_commas_are_tidied():
    assert normalize_prompt("  a  cat\t ,  on a sofa ,, , 8k ,  ") == "a cat, on a sofa, 8k"
    assert normalize_prompt(", , a cat,,") == "a cat"
    assert normalize_prompt("a cat ,sofa") == "a cat,sofa"  # only the space before the comma goes
    assert normalize_prompt("cafe\u0301") == "café" and len(normalize_prompt("cafe\u0301")) == 4  # NFC


def test_unknown_weights_mode_raises():
    with pytest.raises(ValueError, match="weights_syntax"):
        normalize_prompt("a cat", "drop")


@pytest.mark.parametrize("raw", WEIRD)
def test_nothing_raises_on_weird_strings(raw: str):
    vocab = load_vocab()
    for mode in ("strip", "keep"):
        normalized = normalize_prompt(raw, mode)
        assert isinstance(normalized, str) and normalized == normalized.strip(" ,")
        assert drop_reason(raw, normalized, 1000) in (None, DROP_EMPTY, DROP_TOO_LONG, DROP_NON_TEXT)
        assert isinstance(prompt_features(raw, normalized, TERMS), PromptFeatures)
    assert len(dedup_key(raw)) == 16
    content_flag(raw, vocab)
    word_count(raw)


# --- drop reasons -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    (None, DROP_NON_TEXT),
    (42, DROP_NON_TEXT),
    (float("nan"), DROP_NON_TEXT),  # pandas' missing value
    (b"a cat", DROP_NON_TEXT),
    ("", DROP_EMPTY),
    (" \t\u3000", DROP_EMPTY),
    ("--no text", DROP_EMPTY),  # nothing left once the negative part goes
    ("(((", DROP_EMPTY),  # strip mode: only brackets
    ("a cat on a sofa, " * 70, DROP_TOO_LONG),  # 17 * 70 = 1190 chars > 1000
    ("!" * 1001, DROP_TOO_LONG),  # length is checked before junk
    ("\x00" + "a cat " * 200, DROP_TOO_LONG),  # ... and before control characters
    ("a cat\x00 on a sofa", DROP_NON_TEXT),
    ("a cat \x1b[31manime\x1b[0m", DROP_NON_TEXT),
    ("🔥✨😍🎨", DROP_NON_TEXT),  # 0 letters
    ("!?.;:*#@~^", DROP_NON_TEXT),
    ("8k.", DROP_NON_TEXT),  # 1 letter < 3
    ("ab 12345", DROP_NON_TEXT),  # 2 letters < 3
    ("cat 123456", DROP_NON_TEXT),  # 3 letters < 0.4 * 9 non-space chars = 3.6
    ("cat 1234", None),  # 3 letters >= 0.4 * 7 = 2.8
    ("a cat", None),
    ("a\r\ncat\ton a sofa", None),  # \t \n \r are whitespace, not control characters
    ("富士山の風景、浮世絵", None),  # CJK characters are letters
])
def test_drop_reason(raw: object, expected: str | None):
    assert drop_reason(raw, normalize_prompt(raw), max_chars=1000) == expected  # type: ignore[arg-type]


# --- features ---------------------------------------------------------------------------------------------

def test_features_of_a_typical_tagged_prompt():
    raw = "portrait of a woman, highly detailed, by greg rutkowski, trending on artstation, 8k"
    # words: portrait of a woman (4) highly detailed (2) by greg rutkowski (3) trending on artstation (3) 8k (1)
    # tags: "highly detailed", "greg rutkowski", "trending on artstation" (its "artstation" is the same match:
    # longest wins), "8k" = 4; "by greg rutkowski" names a vocabulary artist, so no extra artist phrase
    expected = PromptFeatures(words=13, tags=4, segments=5, has_weights=False, has_negative=False)
    assert features(raw) == expected
    assert features(raw, "keep") == expected


def test_by_phrases_count_as_artists_only_when_they_credit_someone():
    raw = "a castle, art by victo ngai, by james jean, surrounded by trees, by a river, by greg rutkowski"
    # "art by victo ngai" (after an art word) and ", by james jean" (segment start) are credits: 2;
    # "surrounded by trees" and "by a river" are not; "greg rutkowski" is a vocabulary tag: 1. Total 3.
    assert features(raw).tags == 3
    assert features("a hobby by the sea").tags == 0  # "hobby" ends in "by"; "by the" is excluded anyway
    assert features("oil painting by james jean, by james jean").tags == 2  # "oil painting" + one distinct name


def test_weights_and_negative_flags_come_from_the_raw_prompt():
    raw = "((masterpiece)), (a cat:1.2) on a sofa --no blurry"
    # normalised (strip): "masterpiece, a cat on a sofa": 6 words, 1 tag, 2 segments
    assert features(raw) == PromptFeatures(words=6, tags=1, segments=2, has_weights=True, has_negative=True)
    assert features("a cat Negative prompt: ugly").has_negative


@pytest.mark.parametrize(("raw", "has_weights"), [
    ("a cat, (highly detailed:1.2)", True),
    ("a cat, ((masterpiece))", True),
    ("a cat, [blurry]", True),
    ("a cat, {castle}", True),
    ("(masterpiece:1.3, a cat", True),  # unbalanced, but clearly a weight
    ("a cat (fluffy)", False),  # single parentheses are ordinary English
    ("a poster (16:9)", False),  # aspect ratio, not a weight
    ("a cat", False),
])
def test_weights_syntax_detection(raw: str, has_weights: bool):
    assert features(raw).has_weights is has_weights


def test_word_count_counts_tokens_with_a_letter_or_digit():
    assert word_count("a cat -- on a sofa, 8k") == 6  # "--" is not a word
    assert word_count("ukiyo-e cat, 3d") == 3
    assert word_count("café au lait ✨ 🔥") == 3  # non-ASCII path: emoji are not words
    assert word_count("") == 0
    assert within_bounds("a cat on a sofa", [1, 5]) and within_bounds("a cat on a sofa", [5, 5])  # 5 words
    assert not within_bounds("a cat on a sofa", [1, 4]) and not within_bounds("a cat on a sofa", [6, 40])


# --- split ------------------------------------------------------------------------------------------------

def f(words: int, tags: int, segments: int, weights: bool = False, negative: bool = False) -> PromptFeatures:
    return PromptFeatures(words, tags, segments, weights, negative)


@pytest.mark.parametrize(("feats", "expected"), [
    (f(4, 0, 1), LOW),  # "a cat on a sofa"
    (f(13, 4, 5), HIGH),  # the tagged portrait above
    (f(10, 1, 2), NEITHER),  # medium, one tag: 1 < 2 tags and 2 < 4 segments; 1 > 0 tags for low
    # high thresholds, each side (words >= 8 and (tags >= 2 or segments >= 4))
    (f(8, 2, 1), HIGH),
    (f(7, 2, 1), NEITHER),  # 7 < 8 words; 2 tags > 0 so not low
    (f(8, 1, 1), NEITHER),  # 1 < 2 tags
    (f(8, 0, 4), HIGH),
    (f(8, 0, 3), NEITHER),  # 3 < 4 segments; 3 > 2 segments so not low
    # low thresholds, each side (words <= 12, tags <= 0, segments <= 2)
    (f(12, 0, 2), LOW),
    (f(13, 0, 2), NEITHER),
    (f(12, 1, 1), NEITHER),
    (f(12, 0, 3), NEITHER),
    # syntax bonus: 1 tag + 1 = 2 tags -> high
    (f(8, 1, 1, weights=True), HIGH),
    (f(8, 1, 1, negative=True), HIGH),
    # syntax never looks low
    (f(3, 0, 1, weights=True), NEITHER),
    (f(3, 0, 1, negative=True), NEITHER),
])
def test_classify(feats: PromptFeatures, expected: str):
    assert classify(feats, RULES) == expected


def test_syntax_bonus_is_configurable():
    assert classify(f(8, 1, 1, weights=True), SplitRules(syntax_tag_bonus=0)) == NEITHER  # 1 + 0 < 2


@pytest.mark.parametrize("rules", [RULES, SplitRules.from_config(load_config("tiny").data),
                                   SplitRules(low_max_words=20, low_max_tags=1, high_min_words=1)])
def test_low_and_high_never_both_hold(rules: SplitRules):
    # Config validation keeps low_max_tags < high_min_tags and low_max_segments < high_min_segments.
    for words in range(25):
        for tags in range(5):
            for segments in range(7):
                for weights, negative in ((False, False), (True, False), (False, True)):
                    feats = f(words, tags, segments, weights, negative)
                    tags_eff = tags + (rules.syntax_tag_bonus if weights or negative else 0)
                    is_high = words >= rules.high_min_words and (
                        tags_eff >= rules.high_min_tags or segments >= rules.high_min_segments)
                    is_low = (words <= rules.low_max_words and tags <= rules.low_max_tags
                              and segments <= rules.low_max_segments and not (weights or negative))
                    assert not (is_high and is_low)
                    assert classify(feats, rules) == (HIGH if is_high else LOW if is_low else NEITHER)


def test_split_rules_read_the_config():
    data = load_config("tiny").data
    rules = SplitRules.from_config(data)
    assert rules == SplitRules(data.low_max_words, data.low_max_tags, data.low_max_segments, data.high_min_words,
                               data.high_min_tags, data.high_min_segments, data.syntax_tag_bonus)
    assert SplitRules.from_config(DataConfig()) == SplitRules()  # defaults agree
    override = load_config("tiny", ["data.high_min_words=20"]).data
    assert SplitRules.from_config(override).high_min_words == 20


# --- content filters --------------------------------------------------------------------------------------

def test_keyword_hit_uses_word_boundaries_and_multi_word_terms():
    vocab = load_vocab()
    assert {"blood", "bloody"} <= set(vocab.nsfw_terms)  # both are listed, so "bloody" hits as itself
    assert keyword_hit("a bloody knife", vocab.nsfw_terms) == "bloody"
    assert keyword_hit("a bloody knife", ("blood",)) is None  # not on a word boundary
    assert keyword_hit("a bloodhound", vocab.nsfw_terms) is None
    assert keyword_hit("NSFW cat", vocab.nsfw_terms) == "nsfw"
    assert keyword_hit("the Prime  Minister at dawn", vocab.political_terms) == "prime minister"
    assert keyword_hit("a presidential suite", vocab.political_terms) is None  # "president" inside a word
    assert keyword_hit("a presidential debate", vocab.political_terms) == "presidential debate"
    assert keyword_hit("a cat", []) is None
    assert keyword_hit("a red cat", (t for t in ["red", "cat"])) == "red"  # leftmost in the text, any iterable


def test_content_flag():
    vocab = load_vocab()
    assert content_flag("a nude portrait, oil painting", vocab) == "nsfw_keyword"
    assert content_flag("a senator giving a speech", vocab) == "political_keyword"
    assert content_flag("a naked senator", vocab) == "nsfw_keyword"  # nsfw is checked first
    assert content_flag("a cat on a sofa", vocab) is None


def test_nsfw_score_flag():
    assert not nsfw_score_flag(0.1, 0.2, threshold=0.5)
    assert nsfw_score_flag(0.6, 0.0, threshold=0.5) and nsfw_score_flag(0.0, 0.6, threshold=0.5)
    assert not nsfw_score_flag(0.5, 0.5, threshold=0.5)  # strictly above
    assert not nsfw_score_flag(math.nan, math.nan, threshold=0.5)  # unknown is not flagged
    assert nsfw_score_flag(math.nan, 2.0, threshold=0.5)  # DiffusionDB: 2.0 = image already blurred
    assert not nsfw_score_flag(None, None, threshold=0.5)  # type: ignore[arg-type]


# --- near duplicates --------------------------------------------------------------------------------------

def test_dedup_key_equivalences():
    key = dedup_key("a cat on a sofa")
    assert len(key) == 16 and int(key, 16) >= 0
    for variant in ("A cat, on a sofa!!", "a cat on a   sofa", "  A CAT ON A SOFA ", "((a cat)) on a sofa --no dog",
                    "(a cat:1.3) on a sofa", "a cat on a sofa, Negative prompt: ugly", "a cat on a sofa 🔥"):
        assert dedup_key(variant) == key, variant
    assert dedup_key("sci-fi city") == dedup_key("sci fi city")  # punctuation becomes a space


def test_dedup_key_non_equivalences():
    key = dedup_key("a cat on a sofa")
    for other in ("a dog on a sofa", "a sofa on a cat", "a cat on a sofa, 8k", "a cat on sofa", "cat on a sofa"):
        assert dedup_key(other) != key, other
    assert dedup_key("scifi city") != dedup_key("sci fi city")
    assert dedup_key("4k") != dedup_key("8k")


# --- whole tables -----------------------------------------------------------------------------------------

def assert_agrees_with_scalar_rules(raws: list, table: pd.DataFrame, mode: str) -> None:
    assert tuple(table.columns) == ANNOTATION_COLUMNS and len(table) == len(raws)
    for raw, row in zip(raws, table.itertuples(index=False), strict=True):
        normalized = normalize_prompt(raw, mode)
        reason = drop_reason(raw, normalized, 1000)
        assert row.drop_reason == reason, raw
        if reason is not None:
            assert row.prompt == "" and row.quality is None
            continue
        feats = prompt_features(raw, normalized, TERMS)
        got = PromptFeatures(row.words, row.tags, row.segments, bool(row.has_weights), bool(row.has_negative))
        assert (row.prompt, got, row.quality) == (normalized, feats, classify(feats, RULES)), raw


@pytest.mark.parametrize("mode", ["strip", "keep"])
def test_annotate_prompts_agrees_with_the_scalar_rules_on_the_corpus(mode: str):
    raws = [*generate_prompts(500, seed=0), None, 3.5, *WEIRD]
    table = annotate_prompts(raws, RULES, TERMS, mode, max_chars=1000)
    assert_agrees_with_scalar_rules(raws, table, mode)
    kept = table[table.drop_reason.isna()]
    assert set(kept.quality) == {LOW, HIGH, NEITHER}  # the corpus has plain and tag-rich prompts
    assert {"words": "int64", "has_weights": "bool"}.items() <= table.dtypes.astype(str).to_dict().items()


def test_annotate_prompts_on_no_rows():
    table = annotate_prompts([], RULES, TERMS, "strip", 1000)
    assert tuple(table.columns) == ANNOTATION_COLUMNS and len(table) == 0


@pytest.fixture(scope="module")
def discord() -> tuple[list[str], pd.DataFrame]:
    if not DISCORD.exists():
        pytest.skip(f"{DISCORD} not present")
    raws = read_prompts(DISCORD, limit=2000)[0]["prompt"].tolist()
    return raws, annotate_prompts(raws, RULES, TERMS, "strip", 1000)


def test_annotate_prompts_agrees_with_the_scalar_rules_on_real_prompts(discord):
    raws, table = discord
    assert_agrees_with_scalar_rules(raws, table, "strip")


def test_real_tag_style_prompts_are_high_and_short_plain_ones_never(discord):
    raws, table = discord
    commas = pd.Series([r.count(",") for r in raws])
    words = pd.Series([word_count(r) for r in raws])
    tag_style = (commas >= 4) & (words >= 12)
    short_plain = (commas == 0) & (words <= 6)
    # Measured on the first 2,000 rows: 980 tag-style prompts, 100% high; 152 short plain ones, 0% high.
    assert tag_style.sum() > 500 and short_plain.sum() > 50
    assert (table.quality[tag_style] == HIGH).mean() >= 0.9
    assert (table.quality[short_plain] == HIGH).mean() == 0


def test_plain_benchmark_prompts_are_rarely_high():
    if not PARTI.exists():
        pytest.skip(f"{PARTI} not present")
    raws = read_prompts(PARTI)[0]["prompt"].tolist()
    quality = annotate_prompts(raws, RULES, TERMS, "strip", 1000).quality
    # Measured on 1,306 rows: 80.2% low, 18.1% neither, 1.3% high, 0.4% dropped (bare numbers such as "42").
    assert (quality == HIGH).mean() <= 0.05
    assert quality.isin([LOW, NEITHER]).mean() >= 0.9


@pytest.mark.parametrize(("output", "answer"), [
    ("The image prompt is: a cat on a sofa\nHope this helps!", "a cat on a sofa"),
    ("Here is a short description: \"a red car by the sea\"", "a red car by the sea"),
    ("Sure! Here's the summary: a castle at dusk", "a castle at dusk"),
    ("The cat sleeps on the sofa.", "The cat sleeps on the sofa."),  # no lead-in: unchanged
    ("The prompt is:", "The prompt is:"),  # nothing after the lead-in: the line as it is
    ("\n\n  a lighthouse  \n", "a lighthouse"),
])
def test_answer_text_drops_an_assistants_lead_in(output, answer):
    assert answer_text(output) == answer
