"""The main job: every stage in order on one run directory, skipping what is done and resuming what was cut off.

Each stage has a fingerprint: the hash of the config values that decide its output and of the fingerprints of the
stages it reads. A stage whose `_SUCCESS.json` carries the current fingerprint is skipped. A stage that started
with the current fingerprint but did not finish (the job was killed) resumes from its own checkpoint: the data
stage from its committed batches, the reward labels from their cache, the trainers from their latest Ray Train
checkpoint. A stage whose fingerprint changed (its config, or an earlier stage's) starts over, and so does every
stage after it, since their fingerprints include its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bp_ray.config import PipelineConfig
from bp_ray.layout import MANIFEST, RunLayout
from bp_ray.stages import STAGE_NAMES, STAGES, check_stage, run_stage

logger = logging.getLogger(__name__)

STARTED = "_STARTED.json"
PIPELINE_STAGES = STAGE_NAMES
INPUTS = {stage.name: stage.inputs for stage in STAGES}
"""The stages whose outputs each stage reads."""
CONFIG_KEYS = {stage.name: stage.config_keys for stage in STAGES}


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _without(value: Any, path: list[str]) -> Any:
    if not path or not isinstance(value, dict) or path[0] not in value:
        return value
    if len(path) == 1:
        return {k: v for k, v in value.items() if k != path[0]}
    return {**value, path[0]: _without(value[path[0]], path[1:])}


def stage_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The config values that decide a stage's output."""
    tree = cfg.to_dict()
    picked: dict[str, Any] = {}
    for key in CONFIG_KEYS[stage]:
        if key.startswith("-"):
            owner = next(k for k in reversed(picked) if key[1:].startswith(k + "."))
            picked[owner] = _without(picked[owner], key[1:].split(".")[len(owner.split(".")):])
        else:
            picked[key] = _lookup(tree, key)
    return picked


def fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    """Stage -> hash of its config values and of its inputs' fingerprints."""
    out: dict[str, str] = {}
    for stage in PIPELINE_STAGES:
        payload = {"config": stage_config(cfg, stage), "inputs": {s: out[s] for s in INPUTS[stage]}}
        out[stage] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out


@dataclass
class StageRun:
    """What the pipeline did with one stage: "ran", "resumed" or "skipped", its manifest and seconds."""

    stage: str
    action: str
    manifest: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def plan(layout: RunLayout, prints: dict[str, str]) -> dict[str, str]:
    """Stage -> "skip" (done with this fingerprint), "resume" (started with it, not finished) or "run"."""
    actions = {}
    for stage in PIPELINE_STAGES:
        folder = layout.stage_dir(stage)
        if _read_json(layout.success_marker(stage)).get("pipeline_fingerprint") == prints[stage] and \
                (folder / MANIFEST).exists():
            actions[stage] = "skip"
        elif _read_json(folder / STARTED).get("pipeline_fingerprint") == prints[stage]:
            actions[stage] = "resume"
        else:
            actions[stage] = "run"
    return actions


def stage_runners(cfg: PipelineConfig, layout: RunLayout) -> dict[str, Callable[[bool], dict[str, Any]]]:
    """Stage -> run(resume) on this run folder: each stage's declared run, its inputs the folders beside it."""
    def runner(stage: Any) -> Callable[[bool], dict[str, Any]]:
        inputs = {name: layout.stage_dir(name) for name in stage.inputs}
        return lambda resume: run_stage(stage, cfg, inputs, layout.stage_dir(stage.name), resume)

    return {stage.name: runner(stage) for stage in STAGES}


def run_pipeline(cfg: PipelineConfig, runners: dict[str, Callable[[bool], dict[str, Any]]] | None,
                 layout: RunLayout, on_stage: Callable[[str], None] | None = None,
                 on_done: Callable[[StageRun], None] | None = None) -> list[StageRun]:
    """Run, resume or skip every stage in order; `runners[stage](resume)` runs one stage and returns its manifest
    (None: `stage_runners`, the declared stages). `on_stage(stage)` is called before each stage and `on_done(run)`
    after it (the console's line per stage)."""
    runners = runners or stage_runners(cfg, layout)
    prints = fingerprints(cfg)
    actions = plan(layout, prints)
    logger.info("pipeline plan: %s", ", ".join(f"{s} {a}" for s, a in actions.items()))
    for declared in STAGES:  # a config that cannot run a later stage fails now, not hours into the run
        if actions[declared.name] != "skip":
            check_stage(declared, cfg)
    done: list[StageRun] = []
    for stage in PIPELINE_STAGES:
        if on_stage:
            on_stage(stage)
        folder = layout.stage_dir(stage)
        if actions[stage] == "skip":
            done.append(StageRun(stage, "skipped", _read_json(folder / MANIFEST)))
            if on_done:
                on_done(done[-1])
            continue
        start = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STARTED).write_text(json.dumps({"pipeline_fingerprint": prints[stage]}))
        manifest = runners[stage](actions[stage] == "resume")
        if manifest.get("complete", True):
            marker = _read_json(layout.success_marker(stage))
            layout.mark_done(stage, {**marker, "pipeline_fingerprint": prints[stage]})
        done.append(StageRun(stage, "resumed" if actions[stage] == "resume" else "ran", manifest,
                             time.perf_counter() - start))
        if on_done:
            on_done(done[-1])
    return done
