"""The paper preset has no default prompt source: its data stage, and `bp-ray pipeline`, refuse to start without
one and say how to give it; a preset built on it may set one."""

from __future__ import annotations

import pytest

from bp_ray.config import ConfigError
from bp_ray.config_loader import load_config
from bp_ray.data.pipeline import source_problem
from bp_ray.layout import RunLayout
from bp_ray.pipeline import run_pipeline
from bp_ray.stages import BY_NAME, STAGE_NAMES, check_stage, run_stage


def test_the_paper_preset_loads_without_a_source():
    assert load_config("paper").data.source == ""


def test_the_paper_data_stage_refuses_to_start_without_a_source(tmp_path):
    cfg = load_config("paper")
    out = tmp_path / "data"
    with pytest.raises(ConfigError, match=r"data\.source is not set") as raised:
        run_stage(BY_NAME["data"], cfg, {"corpus": tmp_path / "corpus"}, out, False)
    assert "--prompts /path/to/diffusiondb" in str(raised.value) and "--set data.source=PATH" in str(raised.value)
    assert not out.exists()  # refused before any work


def test_the_pipeline_fails_before_its_first_stage(tmp_path):
    ran = []
    runners = {stage: (lambda resume, stage=stage: ran.append(stage) or {}) for stage in STAGE_NAMES}
    with pytest.raises(ConfigError, match=r"data\.source is not set"):
        run_pipeline(load_config("paper"), runners, RunLayout(tmp_path))
    assert ran == [] and not list(tmp_path.iterdir())


def test_a_source_given_on_top_of_the_paper_preset_is_accepted(tmp_path):
    for source in ("corpus", str(tmp_path / "diffusiondb")):  # what --prompts sets, or a preset with base: paper
        check_stage(BY_NAME["data"], load_config("paper", [f"data.source={source}"]))


def test_a_source_naming_an_unset_variable_is_refused_before_work(monkeypatch):
    monkeypatch.delenv("BP_RAY_PROMPTS", raising=False)
    problem = source_problem(load_config("small").data)
    assert problem and "environment variable BP_RAY_PROMPTS, which is not set" in problem
