"""`bp-ray pipeline --dry-run`: every stage once at the smallest counts, one Serve request, and the table."""

from __future__ import annotations

import json

import pytest

from bp_ray.cli import main
from bp_ray.config_loader import load_config

pytestmark = pytest.mark.integration

STAGES = ["corpus", "data", "rewards", "sft", "rm", "ppo", "eval", "serve"]


def test_dry_run_runs_every_stage_once_and_prints_the_table(tmp_path, capfd):
    stale = tmp_path / "dry-run" / "sft" / "left-by-an-earlier-dry-run"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    assert main(["pipeline", "--preset", "tiny", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capfd.readouterr().out  # the console writes to the terminal's file descriptor
    folder = tmp_path / "dry-run"  # never the run folder itself: a dry run starts over
    rows = json.loads((folder / "dry_run.json").read_text())
    assert [row["stage"] for row in rows] == STAGES
    by_stage = {row["stage"]: row for row in rows}
    for stage in STAGES:
        assert by_stage[stage]["peak_bytes"] > 0 and by_stage[stage]["seconds"] > 0
        assert f"\n{stage} " in out  # one table row per stage
    for stage in ("sft", "rm", "ppo", "serve"):
        assert by_stage[stage]["step_seconds"] > 0
        assert by_stage[stage]["gpu_estimate_bytes"] > 0 and by_stage[stage]["formula"]
    assert by_stage["ppo"]["parameters"] > by_stage["sft"]["parameters"] > 0  # policy, critic, reference, RMs
    assert by_stage["serve"]["detail"]["answer"].strip()
    # one step of each trainer, one prompt's seeds rendered, one evaluation prompt
    for stage in ("sft", "ppo"):
        assert json.loads((folder / stage / "manifest.json").read_text())["steps"] == 1
    rewards = json.loads((folder / "rewards" / "manifest.json").read_text())
    assert rewards["unique_prompts"] == 1 and rewards["prompts_rendered"] == 1
    assert rewards["num_seeds"] == load_config("tiny").data.num_seeds  # seeds are kept
    assert not stale.exists()  # a dry run starts over rather than skipping what an earlier one did
    assert not list(folder.glob("*/ray"))  # checkpoints measured, then removed
