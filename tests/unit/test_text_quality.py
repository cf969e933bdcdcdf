"""The text metrics of `bp-ray eval-text`, and which prompts count as unseen."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bp_ray.data.content import content_kept, content_words
from bp_ray.data.vocab import load_vocab, tag_terms
from bp_ray.eval.text_quality import (
    format_table,
    summary_rows,
    text_metrics,
    trained_low_keys,
    unseen_prompts,
)


def test_content_words_drop_stop_words_and_plurals_but_keep_numbers():
    assert content_words("Three cats sitting on the glasses of a table.") == {"three", "cat", "sitting", "glasse",
                                                                              "table"}
    assert content_words("the of a") == set()


def test_content_kept_is_the_share_of_the_input_words_in_the_output():
    assert content_kept("a red car", "a sleek red sports car, 8k") == 1.0
    assert content_kept("a red car", "a blue bicycle") == 0.0
    assert content_kept("two dogs and a cat", "two dogs in a park") == pytest.approx(2 / 3)
    assert content_kept("the", "anything") == 1.0  # nothing to keep


def test_text_metrics_of_one_output():
    terms = tag_terms(load_vocab())
    row = text_metrics("a castle on a hill", "a castle on a hill, highly detailed, trending on artstation, "
                                             "highly detailed, trending on artstation", terms)
    assert row["subject_kept"] == 1.0 and row["content_kept"] == 1.0
    assert row["tags"] >= 2 and row["words"] == 15 and row["repetition"] > 0.2
    lost = text_metrics("a castle on a hill", "an oil painting, 8k", terms)
    assert lost["subject_kept"] == 0.0 and lost["repetition"] == 0.0


def test_trained_prompts_and_duplicates_are_left_out_and_counted(tmp_path):
    pairs = tmp_path / "data"
    pairs.mkdir()
    pd.DataFrame({"low": ["A red car.", "a fox"], "high": ["x y z", "x y z"]}).to_parquet(pairs / "part-00000.parquet")
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                            ["a red car", "a blue car", "A blue car.", "", "a green car", "a fox"]))
    prompts, counts = unseen_prompts(path, trained_low_keys(pairs), 0, 0)
    assert prompts == ["a blue car", "a green car"]
    assert counts == {"file": str(path), "rows_read": 6, "trained_left_out": 2, "count": 2}
    sampled, _ = unseen_prompts(path, set(), 2, 0)
    assert len(sampled) == 2 and sampled == unseen_prompts(path, set(), 2, 0)[0]  # same seed, same draw
    assert trained_low_keys(tmp_path / "missing") == set()


def test_summary_rows_average_per_set_and_over_all_sets():
    rows = [{"set": s, "system": "sft", "subject_kept": k, "content_kept": k, "tags": t, "words": 10.0,
             "repetition": 0.0} for s, k, t in (("parti", 1.0, 2.0), ("parti", 0.0, 4.0), ("draw", 1.0, 0.0))]
    table = summary_rows(rows, ["sft"], ["parti", "draw"])
    by_set = {r["set"]: r for r in table}
    assert by_set["parti"]["n"] == 2 and by_set["parti"]["tags"] == 3.0
    assert by_set["all"]["n"] == 3 and by_set["all"]["subject_kept"] == pytest.approx(2 / 3)
    assert "rm_score" not in by_set["all"]
    # Wilson's interval of 2 / 3 and the t interval of tags (2, 4, 0): mean 2, half-width t(0.975, 2) * 2 / sqrt(3).
    low, high = by_set["all"]["ci"]["subject_kept"]
    assert low == pytest.approx(0.2077, abs=1e-4) and high == pytest.approx(0.9385, abs=1e-4)
    assert by_set["all"]["ci"]["tags"] == pytest.approx([2 - 4.9683, 2 + 4.9683], abs=1e-3)
    assert by_set["draw"]["ci"]["tags"] == [0.0, 0.0]  # one output: no spread to estimate


def test_the_table_shows_each_mean_with_its_interval():
    rows = [{"set": "parti", "system": "sft", "subject_kept": 1.0, "content_kept": 1.0, "content_similarity": s,
             "tags": 1.0, "words": 5.0, "repetition": 0.0} for s in (0.6, 0.8)]
    table = format_table({"table": summary_rows(rows, ["sft"], ["parti"])})
    assert "content_similarity" in table.splitlines()[0]
    assert "| 0.700 [-0.57, 1.97] |" in table  # t(0.975, 1) * 0.1414 / sqrt(2) = 1.2706


def test_colours_kept_counts_only_the_prompts_that_give_a_colour():
    terms = tag_terms(load_vocab())
    outputs = [("A black colored dog.", "a black colored dog with golden fur, wearing a hat"),
               ("a red car", "a red car on a wet street at night"),
               ("a cat on a sofa", "a ginger cat on a purple sofa")]
    rows = [{"set": "draw", "system": "ppo", **text_metrics(p, o, terms)} for p, o in outputs]
    assert [r["colours_kept"] for r in rows] == [0.0, 1.0, None]
    (draw, _) = summary_rows(rows, ["ppo"], ["draw"])
    assert draw["n"] == 3 and draw["colours_n"] == 2 and draw["colours_kept"] == 0.5
    low, high = draw["ci"]["colours_kept"]
    assert low < 0.5 < high
    no_colour = summary_rows(rows[2:], ["ppo"], ["draw"])[0]
    assert "colours_kept" not in no_colour and no_colour["colours_n"] == 0
    table = format_table({"table": [draw, no_colour]}).splitlines()
    assert "colours_kept" in table[0] and "| 0.500 [" in table[2] and "| – |" in table[3]
