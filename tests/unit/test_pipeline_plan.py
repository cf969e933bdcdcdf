"""Which stages the pipeline skips, resumes or reruns, from their fingerprints (no Ray: stages are plain callables)."""

from __future__ import annotations

import json

import pytest

from bp_ray.config_loader import load_config
from bp_ray.layout import RunLayout
from bp_ray.pipeline import PIPELINE_STAGES, fingerprints, plan, run_pipeline

BASE = fingerprints(load_config("tiny"))


@pytest.mark.parametrize(("override", "changed"), [
    ("ppo.total_steps=3", {"ppo", "eval"}),
    ("eval.num_seeds=1", {"eval"}),
    ("sft.lr=0.002", {"sft", "ppo", "eval"}),
    ("rm.epochs=3", {"rm", "ppo", "eval"}),
    ("data.num_seeds=3", {"rewards", "rm", "ppo", "eval"}),
    ("data.render.num_inference_steps=5", {"rewards", "rm", "ppo", "eval"}),
    ("data.nsfw_threshold=0.4", {"data", "rewards", "sft", "rm", "ppo", "eval"}),
    ("data.corpus_rows=100", set(PIPELINE_STAGES)),
    ("models.zoo.tiny.lm_layers=1", set(PIPELINE_STAGES) - {"corpus"}),
    ("serve.port=9000", set()),
    ("data.renderer_pool.max_actors=4", set()),  # how fast, not what
    ("rewards.service_max_batch=4", set()),
])
def test_a_config_change_changes_that_stage_and_the_ones_that_read_it(override, changed):
    after = fingerprints(load_config("tiny", [override]))
    assert {stage for stage in PIPELINE_STAGES if after[stage] != BASE[stage]} == changed


def test_fingerprints_are_stable():
    assert fingerprints(load_config("tiny")) == BASE


def fake_runners(root, calls: list[tuple[str, bool]], incomplete: frozenset[str] = frozenset()):
    """Stages that record their call and write a manifest, as the real ones do."""
    def runner(stage):
        def run(resume: bool) -> dict:
            calls.append((stage, resume))
            manifest = {"stage": stage, "complete": stage not in incomplete}
            (root / stage / "manifest.json").write_text(json.dumps(manifest))
            return manifest
        return run
    return {stage: runner(stage) for stage in PIPELINE_STAGES}


def test_a_first_run_runs_everything_and_a_second_skips_everything(tmp_path):
    layout, cfg = RunLayout(tmp_path), load_config("tiny")
    calls: list[tuple[str, bool]] = []
    runners = fake_runners(tmp_path, calls)
    runs = run_pipeline(cfg, runners, layout)
    assert calls == [(stage, False) for stage in PIPELINE_STAGES]
    assert [r.action for r in runs] == ["ran"] * len(PIPELINE_STAGES)
    assert all(layout.is_done(stage) for stage in PIPELINE_STAGES)
    calls.clear()
    runs = run_pipeline(cfg, runners, layout)
    assert calls == [] and [r.action for r in runs] == ["skipped"] * len(PIPELINE_STAGES)
    assert runs[3].manifest == {"stage": "sft", "complete": True}  # read back for the summary


def test_a_stage_cut_off_resumes_and_a_stage_with_a_new_config_starts_over(tmp_path):
    layout, cfg = RunLayout(tmp_path), load_config("tiny")
    calls: list[tuple[str, bool]] = []
    runners = fake_runners(tmp_path, calls)
    run_pipeline(cfg, runners, layout)
    layout.success_marker("sft").unlink()  # as if the job died inside SFT
    assert plan(layout, fingerprints(cfg))["sft"] == "resume"
    calls.clear()
    run_pipeline(cfg, runners, layout)
    assert calls == [("sft", True)]  # later stages read SFT, but their fingerprints did not change
    changed = load_config("tiny", ["sft.lr=0.002"])
    calls.clear()
    run_pipeline(changed, runners, layout)
    assert calls == [("sft", False), ("ppo", False), ("eval", False)]


def test_an_incomplete_stage_is_not_marked_done(tmp_path):
    layout, cfg = RunLayout(tmp_path), load_config("tiny")
    calls: list[tuple[str, bool]] = []
    runners = fake_runners(tmp_path, calls, incomplete=frozenset({"rm"}))
    run_pipeline(cfg, runners, layout)
    assert not layout.is_done("rm") and layout.is_done("sft")
    assert plan(layout, fingerprints(cfg))["rm"] == "resume"


def test_each_declared_stage_reads_earlier_stages_and_runs_on_the_run_folders(tmp_path, monkeypatch):
    import dataclasses

    import bp_ray.pipeline as pipeline
    from bp_ray.stages import STAGES

    calls = {}

    def recorder(name):
        def run(inputs, out, resume, **sections):
            calls[name] = (inputs, out, resume, sections)
            return {"stage": name}
        return run

    monkeypatch.setattr(pipeline, "STAGES", tuple(dataclasses.replace(s, run=recorder(s.name)) for s in STAGES))
    layout = RunLayout(tmp_path)
    cfg = load_config("tiny")
    runners = pipeline.stage_runners(cfg, layout)
    assert list(runners) == list(PIPELINE_STAGES)
    for position, stage in enumerate(STAGES):
        assert all(PIPELINE_STAGES.index(read) < position for read in stage.inputs), stage.name
        runners[stage.name](True)
        inputs, out, resume, sections = calls[stage.name]
        assert inputs == {read: tmp_path / read for read in stage.inputs} and out == tmp_path / stage.name and resume
        # each stage gets its declared sections of the config and nothing else
        assert sections == {name: getattr(cfg, name) for name in stage.sections}, stage.name
    assert calls["ppo"][0].keys() == {"data", "sft", "rm", "rewards"}


def test_each_stage_function_takes_exactly_its_declared_sections():
    import inspect

    from bp_ray.stages import STAGES

    for stage in STAGES:
        keyword_only = [name for name, parameter in inspect.signature(stage.run).parameters.items()
                        if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
        assert keyword_only == list(stage.sections), stage.name
        # what decides a stage's output is among what it reads
        assert {key.lstrip("-").split(".")[0] for key in stage.config_keys} <= set(stage.sections), stage.name


def test_the_corpus_stage_generates_nothing_when_the_pairs_come_from_prompt_files(tmp_path):
    from bp_ray.stages import BY_NAME, run_stage
    from bp_ray.summaries import corpus_summary

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a sofa\n")
    cfg = load_config("tiny", [f"data.source={prompts}"])
    manifest = run_stage(BY_NAME["corpus"], cfg, {}, tmp_path / "corpus", False)
    assert manifest["not_used"] and not list((tmp_path / "corpus").glob("*.parquet"))
    assert corpus_summary(manifest) == f"corpus: not used (data.source is {prompts})"
    assert fingerprints(cfg)["corpus"] != BASE["corpus"]  # switching back to the corpus generates it
