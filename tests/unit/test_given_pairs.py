"""Pair source (v), `given`: real pairs from files, a stable used share, bad rows skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bp_ray.data import columns as C
from bp_ray.data.given_pairs import in_used_share, read_given_pairs
from tests.conftest import shared_path


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_pairs_are_read_with_their_high_field_and_bad_rows_counted(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "A red car.", "upsampled": "a sleek red sports car on a sunlit street"},
        {"prompt": "a dog", "upsampled": "  "},                      # no high prompt
        {"prompt": "", "upsampled": "a cat on a velvet sofa"},       # no low prompt
        "{not json",
        {"prompt": "a fox", "upsampled": "a red fox in a misty forest at dawn"},
    ])
    pairs, counts = read_given_pairs([path], "upsampled", 1.0, first_order=100)
    assert pairs[[C.LOW, C.HIGH]].values.tolist() == [
        ["A red car.", "a sleek red sports car on a sunlit street"], ["a fox", "a red fox in a misty forest at dawn"]]
    assert (pairs[C.PAIR_SOURCE] == "given").all() and pairs[C.PAIR_ID].is_unique
    assert pairs[C.ROW_ORDER].tolist() == [100, 101]  # after the source rows
    assert counts[str(path)] == {"rows_read": 4, "rows_skipped": {"invalid_json": 1, "missing_high": 1,
                                                                  "missing_low": 1},
                                 "used": 2, "held_back": 0}


def test_a_missing_high_field_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "better": "b c d"}])
    with pytest.raises(ValueError, match=r"no 'upsampled' field.*data\.pair_high_field"):
        read_given_pairs([path], "upsampled", 1.0)


def test_the_used_share_is_stable_and_splits_near_its_fraction(tmp_path):
    prompts = [f"a photo of object number {i}" for i in range(2000)]
    used = [in_used_share(p, 0.5) for p in prompts]
    assert 0.45 < sum(used) / len(used) < 0.55
    # a near duplicate (case, punctuation) falls on the same side: the split cannot leak a prompt
    assert all(in_used_share(p.upper() + ".", 0.5) == u for p, u in zip(prompts[:200], used[:200], strict=True))
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "high": p + ", detailed"} for p in prompts[:300]])
    pairs, counts = read_given_pairs([path], "high", 0.5)
    assert set(pairs[C.LOW]) == {p for p, u in zip(prompts[:300], used[:300], strict=True) if u}
    assert counts[str(path)]["used"] + counts[str(path)]["held_back"] == 300


def test_drawbench_upsampled_pairs_split_into_two_disjoint_halves():
    path = shared_path("data", "prompts", "drawbench_upsampled_pairs.jsonl")
    pairs, counts = read_given_pairs([path], "upsampled", 0.5)
    drawbench = [json.loads(line)["prompt"] for line in shared_path("data", "prompts", "drawbench.jsonl")
                 .read_text().splitlines()]
    unseen = [p for p in drawbench if not in_used_share(p, 0.5)]
    assert counts[str(path)]["used"] == len(pairs) and 50 < len(pairs) < 110
    assert not set(pairs[C.LOW]) & set(unseen) and len(unseen) + len(pairs) == len(drawbench)
