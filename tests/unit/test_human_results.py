"""Human-study results from a hand-made votes table: counts in system terms, agreement, side bias, the console and
HTML renderings, the CSV export and the report.html update."""

from __future__ import annotations

import html
import io
import json

import pandas as pd
import pytest

from bp_ray.eval import human_results
from bp_ray.eval.human_results import (
    HUMAN_BEGIN,
    HUMAN_END,
    format_results,
    human_section,
    results_html,
    summarize,
    update_report,
    write_votes_csv,
)
from bp_ray.eval.human_stats import wilson_interval

COLUMNS = ["vote_id", "rater", "rater_id", "item_id", "prompt_id", "prompt", "system_a", "system_b", "left_system",
           "right_system", "choice", "created_at", "elapsed_ms"]
PPO = ("original", "ppo")
SFT = ("original", "sft")
# (vote_id, rater_id, prompt_id, pair, left_system, choice); label = which system won: a (system_a), tie, b
VOTES = [
    (1, "r1", 0, PPO, "ppo", "left"),        # b
    (2, "r1", 1, PPO, "original", "right"),  # b
    (3, "r1", 2, PPO, "original", "left"),   # a
    (4, "r2", 0, PPO, "original", "right"),  # b
    (5, "r2", 1, PPO, "ppo", "tie"),         # tie
    (6, "r2", 2, PPO, "ppo", "right"),       # a
    (7, "r3", 0, PPO, "ppo", "right"),       # a, but r3 votes on this item again below: not counted
    (8, "r1", 0, SFT, "sft", "left"),        # b
    (9, "r2", 0, SFT, "original", "left"),   # a
    (10, "r3", 0, PPO, "ppo", "left"),       # b, replaces vote 7
]


def votes_frame(rows=VOTES) -> pd.DataFrame:
    records = []
    for vote_id, rater_id, prompt_id, (system_a, system_b), left, choice in rows:
        right = system_b if left == system_a else system_a
        records.append((vote_id, f"Rater {rater_id}", rater_id, f"p{prompt_id:04d}:{system_a}~{system_b}",
                        prompt_id, f"prompt {prompt_id}, with a comma", system_a, system_b, left, right, choice,
                        f"2025-01-01T00:00:{vote_id:02d}+00:00", 1000 * vote_id))
    return pd.DataFrame(records, columns=COLUMNS)


def test_summarize_counts_wins_in_system_terms_whatever_the_side():
    summary = summarize(votes_frame())
    json.dumps(summary, allow_nan=False)
    ppo, sft = summary["pairs"]
    # counted ppo votes (7 superseded by 10): b, b, a, b, tie, a, b -> 4 wins, 1 tie, 2 losses
    assert (ppo["system_a"], ppo["system_b"]) == PPO
    assert (ppo["votes"], ppo["wins"], ppo["ties"], ppo["losses"]) == (7, 4, 1, 2)
    assert ppo["win_rate"] == pytest.approx(4.5 / 7)
    assert ppo["ci"] == pytest.approx(list(wilson_interval(4.5, 7)))
    # 4 wins vs 2 losses: 2 * (C(6,4) + C(6,5) + C(6,6)) / 64 = 44/64
    assert ppo["p_sign"] == pytest.approx(0.6875)
    assert (ppo["raters"], ppo["items"]) == (3, 3)
    assert (sft["wins"], sft["ties"], sft["losses"], sft["p_sign"], sft["raters"], sft["items"]) == (1, 0, 1, 1.0,
                                                                                                       2, 1)
    # median of 1000, 2000, ..., 10000 ms over every vote, the superseded one included
    assert summary["totals"] == {"votes": 10, "counted": 9, "repeat_votes": 1, "raters": 3, "items": 4,
                                 "median_elapsed_ms": 5500.0}


def test_side_bias_counts_sides_not_systems():
    side = summarize(votes_frame())["side_bias"]
    # counted votes: left 1, 3, 8, 9, 10; right 2, 4, 6; tie 5
    assert (side["left_wins"], side["right_wins"], side["ties"]) == (5, 3, 1)
    # share 5/8; p = 2 * (C(8,5) + C(8,6) + C(8,7) + C(8,8)) / 256 = 2 * 93 / 256
    assert side["share_left"] == pytest.approx(0.625)
    assert side["p"] == pytest.approx(186 / 256)


def test_agreement_on_items_with_two_or_more_raters():
    agreement = summarize(votes_frame())["agreement"]
    # p0 ppo: r1 b, r2 b, r3 b (3 pairs agree); p1: b / tie (1 pair, no); p2: a / a (yes); p0 sft: b / a (no)
    assert (agreement["items"], agreement["rater_pairs"]) == (4, 6)
    assert agreement["pair_agreement"] == pytest.approx(4 / 6)
    # only r1 and r2 share 2+ items (all four): r1 b, b, a, b; r2 b, tie, a, a -> p_o = 2/4
    # r1: b 3, a 1; r2: b 1, a 2, tie 1 -> p_e = (3*1 + 1*2) / 16 = 5/16; kappa = (1/2 - 5/16) / (11/16) = 3/11
    assert agreement["cohen_kappa"] == pytest.approx(3 / 11)
    assert (agreement["cohen_rater_pairs"], agreement["cohen_undefined"]) == (1, 0)
    # counts (a, tie, b): (0,0,3), (0,1,1), (2,0,0), (1,0,1) -> P_i = 1, 0, 1, 0, Pbar = 1/2
    # p_j = 3/9, 1/9, 5/9 -> P_e = 35/81; kappa = (1/2 - 35/81) / (46/81) = 5.5/46 = 11/92
    assert agreement["fleiss_kappa"] == pytest.approx(11 / 92)


def test_agreement_is_null_without_shared_items():
    summary = summarize(votes_frame([row for row in VOTES if row[1] == "r1"]))
    json.dumps(summary, allow_nan=False)
    agreement = summary["agreement"]
    assert (agreement["items"], agreement["rater_pairs"], agreement["cohen_rater_pairs"]) == (0, 0, 0)
    assert agreement["pair_agreement"] is None and agreement["cohen_kappa"] is None
    assert agreement["fleiss_kappa"] is None
    assert "no item has votes from 2 raters" in format_results(summary)


def test_no_votes_give_a_zero_summary_and_a_plain_sentence():
    for empty in (votes_frame([]), pd.DataFrame()):
        summary = summarize(empty)
        json.dumps(summary, allow_nan=False)
        assert summary["totals"]["votes"] == 0 and summary["pairs"] == []
        assert format_results(summary) == "No human votes yet."
        assert "No human votes yet." in results_html(summary)


def test_bad_votes_are_refused():
    frame = votes_frame()
    frame.loc[0, "choice"] = "both"
    with pytest.raises(ValueError, match="unknown choice"):
        summarize(frame)
    frame = votes_frame()
    frame.loc[0, "left_system"] = "sft"
    with pytest.raises(ValueError, match="not the pair"):
        summarize(frame)


def test_format_results_shows_the_figures():
    text = format_results(summarize(votes_frame()))
    # Wilson interval of 4.5/7: [0.302560, 0.881917] (worked out in test_human_stats)
    assert "ppo vs original: 4 wins / 1 ties / 2 losses, win rate 0.64 [0.30, 0.88], sign test p=0.688" in text
    assert "sft vs original: 1 wins / 0 ties / 1 losses, win rate 0.50" in text
    assert "10 votes from 3 raters on 4 items, median 5.5 s per vote" in text
    assert "4 items rated by 2+ raters, 67% of 6 rater pairs agree" in text
    assert "Cohen's kappa 0.27 (mean over 1 rater pairs" in text and "Fleiss' kappa 0.12" in text
    assert "of 8 decided votes (binomial p=0.727)" in text


def test_results_html_has_the_table_and_escapes_every_name():
    hostile = "<script>alert('x')</script>"
    rows = [(1, "r1", 0, ("original", hostile), hostile, "left"), (2, "r2", 0, ("original", hostile), "original",
                                                                   "tie")]
    fragment = results_html(summarize(votes_frame(rows)))
    assert fragment.startswith('<section id="human">') and fragment.endswith("</section>")
    assert "<h2>Human preference</h2>" in fragment and 'id="human-results"' in fragment
    assert "<script" not in fragment
    assert html.escape(hostile) in fragment
    assert "1 / 1 / 0" in fragment


def test_write_votes_csv_round_trips_every_column(tmp_path):
    frame = votes_frame()
    frame.loc[0, "prompt"] = 'a "quoted", multi-line\nprompt – ünïcode'
    frame.loc[1, "rater_id"] = "007"  # must come back as text, not the number 7
    text_columns = {c: str for c in COLUMNS if frame[c].dtype == object}
    buffer = io.StringIO()
    write_votes_csv(frame, buffer)
    back = pd.read_csv(io.StringIO(buffer.getvalue()), dtype=text_columns)
    pd.testing.assert_frame_equal(back, frame)
    write_votes_csv(frame, tmp_path / "votes.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "votes.csv", dtype=text_columns), frame)


PAGE = "<!DOCTYPE html>\n<html><body>\n<h1>bp-ray evaluation</h1>\n{middle}<h2>Images</h2>\n</body></html>\n"


@pytest.mark.parametrize("middle", [f"{HUMAN_BEGIN}{HUMAN_END}\n", ""], ids=["markers", "older report"])
def test_update_report_is_idempotent(tmp_path, middle):
    assert not update_report(tmp_path, summarize(votes_frame()))
    report = tmp_path / "report.html"
    report.write_text(PAGE.format(middle=middle))
    assert update_report(tmp_path, summarize(votes_frame([])))
    assert "No human votes yet." in report.read_text()

    summary = summarize(votes_frame())
    assert update_report(tmp_path, summary)
    once = report.read_text()
    assert update_report(tmp_path, summary)
    assert report.read_text() == once
    assert once.count(HUMAN_BEGIN) == once.count(HUMAN_END) == 1
    assert f"{HUMAN_BEGIN}{results_html(summary)}{HUMAN_END}" in once
    assert "No human votes yet." not in once  # the old section was replaced, not kept beside the new one
    assert once.index("<h1>") < once.index(HUMAN_BEGIN) < once.index("</body>")
    assert once.endswith("</body></html>\n")


def test_human_section_is_empty_markers_until_there_are_votes(tmp_path, monkeypatch):
    assert human_section(tmp_path) == f"{HUMAN_BEGIN}{HUMAN_END}"
    votes_file = tmp_path / "human" / "votes.sqlite"
    votes_file.parent.mkdir()
    votes_file.touch()
    monkeypatch.setattr(human_results, "read_votes", lambda path: votes_frame([]))
    assert human_section(tmp_path) == f"{HUMAN_BEGIN}{HUMAN_END}"
    monkeypatch.setattr(human_results, "read_votes", lambda path: votes_frame())
    assert human_section(tmp_path) == f"{HUMAN_BEGIN}{results_html(summarize(votes_frame()))}{HUMAN_END}"


def minimal_results() -> dict:
    """The fields of results.json that write_report reads, for two systems and one metric."""
    return {"preset": "tiny", "prompts": {"count": 2, "source": "embedded"}, "seeds": [0],
            "render": {"width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 7.5,
                       "scheduler": "ddim"},
            "alpha": 0.5, "metrics": ["reward"], "prompt_metrics": [], "systems": ["original", "ppo"],
            "table": [{"system": "original", "n": 2, "reward_mean": 1.0, "reward_ci": 0.1},
                      {"system": "ppo", "n": 2, "reward_mean": 2.0, "reward_ci": 0.1}],
            "comparisons": [], "long_prompts": {"limit_tokens": 77, "mode": "truncate",
                                                "systems": {"original": {"over_limit": 0}, "ppo": {"over_limit": 0}}}}


def test_write_report_leaves_markers_that_update_report_fills(tmp_path, monkeypatch):
    from bp_ray.eval.report import write_report

    per_prompt = pd.DataFrame({"system": ["original", "original", "ppo", "ppo"], "prompt_id": [0, 1, 0, 1],
                               "reward": [1.0, 1.0, 2.0, 2.0]})
    texts = {"original": ["a", "b"], "ppo": ["a, nice", "b, nice"]}
    write_report(tmp_path, minimal_results(), ["a", "b"], texts, per_prompt, {}, {})
    page = (tmp_path / "report.html").read_text()
    assert f"{HUMAN_BEGIN}{HUMAN_END}" in page  # no votes file
    assert page.index("Paired comparisons") < page.index(HUMAN_BEGIN) < page.index("Long prompts")

    votes_file = tmp_path / "human" / "votes.sqlite"
    votes_file.parent.mkdir()
    votes_file.touch()
    monkeypatch.setattr(human_results, "read_votes", lambda path: votes_frame())
    write_report(tmp_path, minimal_results(), ["a", "b"], texts, per_prompt, {}, {})
    page = (tmp_path / "report.html").read_text()
    assert 'id="human-results"' in page and "<script" not in page
    assert update_report(tmp_path, summarize(votes_frame()))
    assert (tmp_path / "report.html").read_text() == page
