"""Pair candidates, pair-level cleaning, cross-batch duplicates and the atomic work store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bp_ray.config import DataConfig
from bp_ray.data import columns as C
from bp_ray.data import work_store
from bp_ray.data.pairs import build_candidates, clean_candidates, mark_duplicates, pair_drop_reason, pair_id
from bp_ray.data.vocab import load_vocab

HIGH = "a castle on a hill, highly detailed, digital painting, trending on artstation"


def processed_rows() -> pd.DataFrame:
    """Three rows as they leave the model stages: a high row with an image, a high without, a low."""
    return pd.DataFrame({
        C.ROW_ID: ["r0", "r1", "r2"], C.ROW_ORDER: [0, 1, 2], C.SOURCE: ["t"] * 3,
        C.PROMPT: [HIGH, HIGH + ", 8k", "a cat on a sofa"], C.QUALITY: ["high", "high", "low"],
        C.IMAGE_REF: ["zip::a.png", "", ""],
        C.CAPTION: ["a castle", "", ""], C.SUMMARY: ["a castle on a hill", "a castle", ""],
        C.EXPANSION: ["", "", "a cat on a sofa, oil painting, 8k"], C.GEN_ERROR: ["", "", ""],
        C.AESTHETIC: [5.5, np.nan, np.nan],
    })


def test_each_enabled_source_proposes_its_pairs():
    candidates = build_candidates(processed_rows(), DataConfig())
    by_source = {s: candidates[candidates[C.PAIR_SOURCE] == s] for s in ("caption", "summary", "expansion")}
    # caption: only the high row with an image; summary: both high rows; expansion: the low row
    assert by_source["caption"][[C.LOW, C.HIGH]].values.tolist() == [["a castle", HIGH]]
    assert by_source["summary"][C.ROW_ID].tolist() == ["r0", "r1"]
    assert by_source["expansion"][[C.LOW, C.HIGH]].values.tolist() == [
        ["a cat on a sofa", "a cat on a sofa, oil painting, 8k"]]
    assert by_source["caption"][C.PAIR_ID].iloc[0] == pair_id("r0", "caption")
    assert len(set(candidates[C.PAIR_ID])) == len(candidates)


def test_a_skipped_stage_means_nothing_was_generated_there():
    rows = processed_rows().drop(columns=[C.CAPTION]).assign(**{C.IMAGE_REF: ""})  # no images: no captioner
    candidates = build_candidates(rows, DataConfig())
    assert "caption" not in set(candidates[C.PAIR_SOURCE])
    assert len(candidates) == 3  # two summaries and one expansion still proposed


def test_stripped_pairs_need_no_model_and_survive_an_llm_error():
    rows = processed_rows().assign(**{C.GEN_ERROR: ["rate_limited", "", ""]})
    cfg = DataConfig(use_captions=False, use_summaries=False, use_expansions=False, use_stripped=True)
    candidates = build_candidates(rows, cfg)
    assert candidates[C.PAIR_SOURCE].unique().tolist() == ["stripped"]
    assert candidates[[C.ROW_ID, C.LOW]].values.tolist() == [["r0", "a castle on a hill"], ["r1", "a castle on a hill"]]
    assert (candidates[C.GEN_ERROR] == "").all()  # r0's LLM error belongs to its summary, not to this pair
    assert candidates[C.IMAGE_REF].tolist() == ["zip::a.png", ""]  # the aesthetic filter still sees the image


def test_disabled_sources_propose_nothing():
    cfg = DataConfig(use_captions=False, use_expansions=False)
    assert set(build_candidates(processed_rows(), cfg)[C.PAIR_SOURCE]) == {"summary"}
    cfg = DataConfig(use_captions=False, use_summaries=False, use_expansions=False)
    assert build_candidates(processed_rows(), cfg).empty


@pytest.mark.parametrize(("low", "high", "aesthetic", "error", "overrides", "reason"), [
    ("a cat", "a cat, oil painting, 8k", np.nan, "", {}, ""),
    ("a cat", "a cat, oil painting", np.nan, "rate_limited", {}, "generation_failed"),
    ("", "a cat, oil painting", np.nan, "", {}, "generation_failed"),
    ("a cat", "a nude cat, oil painting", np.nan, "", {}, "nsfw_keyword"),
    ("a cat", "a nude cat, oil painting", np.nan, "", {"keyword_filter": False}, ""),
    ("a cat", "an election poster, oil painting", np.nan, "", {}, "political_keyword"),
    ("a cat", "a cat", np.nan, "", {}, "length"),  # high needs >= 3 words
    ("a cat on a mat", "A cat on a mat!", np.nan, "", {}, "same_low_high"),
    ("a cat", "a cat, oil painting, 8k", 4.0, "", {"aesthetic_threshold": 5.0}, "aesthetic"),
    ("a cat", "a cat, oil painting, 8k", 6.0, "", {"aesthetic_threshold": 5.0}, ""),
    ("a cat", "a cat, oil painting, 8k", np.nan, "", {"aesthetic_threshold": 5.0}, ""),  # no image: no filter
])
def test_pair_drop_reasons(low, high, aesthetic, error, overrides, reason):
    assert pair_drop_reason(low, high, aesthetic, error, DataConfig(**overrides), load_vocab()) == reason


def test_duplicates_across_batches_keep_the_first_by_source_row_order():
    cfg, vocab = DataConfig(), load_vocab()
    rows = processed_rows()
    later = rows.assign(**{C.ROW_ID: ["r7", "r8", "r9"], C.ROW_ORDER: [7, 8, 9]})
    # batches committed in reverse order: the result must not depend on it
    pairs = pd.concat([clean_candidates(build_candidates(later, cfg), cfg, vocab),
                       clean_candidates(build_candidates(rows, cfg), cfg, vocab)], ignore_index=True)
    marked = mark_duplicates(pairs)
    duplicates = marked[marked[C.DROP_REASON] == "duplicate"]
    assert set(duplicates[C.ROW_ID]) == {"r7", "r8", "r9"}
    assert (marked[C.DROP_REASON] == "").sum() == len(build_candidates(rows, cfg))


def test_commit_is_atomic_and_names_batches_by_their_rows(tmp_path):
    cfg, vocab = DataConfig(), load_vocab()
    candidates = clean_candidates(build_candidates(processed_rows(), cfg), cfg, vocab)
    first = work_store.commit_batch(tmp_path, candidates, ["r2", "r0", "r1"])
    again = work_store.commit_batch(tmp_path, candidates, ["r0", "r1", "r2"])  # a retried batch
    assert first == again and len(work_store.committed_files(tmp_path)) == 1
    assert work_store.committed_row_ids(tmp_path) == {"r0", "r1", "r2"}
    (tmp_path / ".tmp-deadbeef.parquet").write_bytes(b"half a file")  # what a killed writer leaves
    assert work_store.committed_row_ids(tmp_path) == {"r0", "r1", "r2"}  # never read as committed
    assert work_store.clear_partial_writes(tmp_path) == 1
    assert len(work_store.read_committed(tmp_path)) == len(candidates)


def test_shards_hold_every_kept_pair_once(tmp_path):
    cfg, vocab = DataConfig(), load_vocab()
    pairs = clean_candidates(build_candidates(processed_rows(), cfg), cfg, vocab)
    paths = work_store.write_shards(pairs, tmp_path, shard_rows=2)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet"]
    back = pd.concat([pd.read_parquet(p) for p in paths])
    assert sorted(back[C.PAIR_ID]) == sorted(pairs[C.PAIR_ID])
    assert len(work_store.write_shards(pairs.iloc[:1], tmp_path, shard_rows=2)) == 1  # old shards replaced
    assert len(list(tmp_path.glob("part-*.parquet"))) == 1


def test_llm_fraction_picks_the_same_rows_for_the_rewriter_and_the_candidates():
    from bp_ray.data.pairs import llm_rows

    ids = [f"file:{i}" for i in range(400)]
    chosen = llm_rows(ids, 0.25)
    assert 60 < chosen.sum() < 140 and (llm_rows(ids[::-1], 0.25)[::-1] == chosen).all()  # by id, not position
    assert llm_rows(ids, 1.0).all()
    rows = processed_rows()
    cfg = DataConfig(use_captions=False, llm_fraction=0.5)
    picked = llm_rows(rows[C.ROW_ID].tolist(), 0.5)
    candidates = build_candidates(rows, cfg)
    expected = set(rows.loc[picked & (rows[C.QUALITY] != ""), C.ROW_ID])
    assert set(candidates[C.ROW_ID]) == expected


def test_off_topic_filter_drops_pairs_whose_low_prompt_describes_something_else():
    cfg, vocab = DataConfig(pair_min_low_in_high=1.0, pair_min_subject_in_low=0.6), load_vocab()
    high = "a large red circle above a small blue square, dark background, high contrast"
    assert pair_drop_reason("a red circle and a blue square", high, np.nan, "", cfg, vocab) == ""
    assert pair_drop_reason("a red circle and a green square", high, np.nan, "", cfg, vocab) == "off_topic"
    assert pair_drop_reason("a red circle", high, np.nan, "", cfg, vocab) == "off_topic"  # half the subject
    # the style tail is not subject: a low prompt need not name it
    assert pair_drop_reason("a red circle", "a large red circle, dark background, sharp", np.nan, "", cfg,
                            vocab) == ""
    # off by default: the same pair passes
    assert pair_drop_reason("a red circle and a green square", high, np.nan, "", DataConfig(), vocab) == ""


def test_high_subject_from_low_keeps_the_users_words_after_the_filters_judged_the_original():
    from bp_ray.data.pairs import with_low_subject

    assert with_low_subject("a red circle.", "a large red circle above x, dark background,, sharp") == \
        "a red circle, dark background, sharp"
    high = "a large red circle above a small blue square, dark background, high contrast"
    candidates = pd.DataFrame({C.LOW: ["a red circle and a blue square", "a red circle and a green square",
                                       "a large red circle"],
                               C.HIGH: [high, high, "a large red circle"], C.AESTHETIC: [np.nan] * 3,
                               C.GEN_ERROR: [""] * 3, C.PAIR_SOURCE: ["caption"] * 3})
    cfg = DataConfig(pair_min_low_in_high=1.0, high_subject_from_low=True)
    out = clean_candidates(candidates, cfg, load_vocab())
    assert out[C.HIGH].tolist()[0] == "a red circle and a blue square, dark background, high contrast"
    assert out[C.DROP_REASON].tolist() == ["", "off_topic", "same_low_high"]
    untouched = clean_candidates(candidates, DataConfig(), load_vocab())
    assert untouched[C.HIGH].tolist() == candidates[C.HIGH].tolist()


@pytest.mark.parametrize(("generated", "meta"), [
    ("This image prompt is a fun and creative way to share a cute fox in a forest", True),
    ("The image prompt is a vivid description of a breathtaking scene", True),
    ("Here is a short description of a snowy lodge", True),
    ("a snowy mountain lodge by a river in the evening sun", False),
    ("The sun over a pixiv fanbox, cinematic light", False),
    ("the description of a dragon", True),
])
def test_an_llm_writing_about_the_prompt_instead_of_one_is_dropped(generated, meta):
    vocab = load_vocab()
    summary = pair_drop_reason(generated, "a cat, oil painting, 8k", np.nan, "", DataConfig(), vocab, generated)
    assert summary == ("meta_answer" if meta else "")
    # Only what a model wrote is judged: the same words in a user's own prompt are kept.
    assert pair_drop_reason(generated, "a cat, oil painting, 8k", np.nan, "", DataConfig(), vocab) == ""
