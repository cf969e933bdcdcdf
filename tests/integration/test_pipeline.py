"""The main job, `bp-ray pipeline`, as users run it: killed mid-stage and rerun, then rerun with one stage's
config changed. Each run is its own `bp-ray` process with its own local Ray."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

pytestmark = pytest.mark.integration

SMALL = ["data.corpus_rows=60", "rm.epochs=1", "rm.heads=shared_backbone", "ppo.total_steps=2",
         "ppo.checkpoint_every=2", "ppo.rollout_batch_size=8", "ppo.eval_prompts=4", "eval.num_prompts=4",
         "eval.num_seeds=1", "eval.grid_prompts=2",
         # long enough (about 40 steps) to be killed after its first checkpoint and before its end
         "sft.epochs=12", "sft.checkpoint_every=4"]


def pipeline_argv(run: Path, zoo_dir: str, *extra: str) -> list[str]:
    sets = [f"models.zoo_dir={zoo_dir}", *SMALL, *extra]
    return [sys.executable, "-m", "bp_ray.cli", "pipeline", "--preset", "tiny", "--out", str(run),
            *[arg for s in sets for arg in ("--set", s)]]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the pipeline and every process it started (its local Ray included), as a crash would."""
    family = [process.pid, *(p.pid for p in psutil.Process(process.pid).children(recursive=True))]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):  # already gone with its parent
            os.kill(pid, signal.SIGKILL)
    process.wait(30)


def stage_actions(out: str) -> dict[str, str]:
    """From the summary: stage -> "skipped" / "ran" / "resumed"."""
    actions = {}
    for line in out.splitlines():
        for stage in ("corpus", "data", "rewards", "sft", "rm", "ppo", "eval"):
            for action in ("skipped", "ran", "resumed"):
                # progress bars of Ray workers may be drawn in front of a summary line: search, don't anchor
                if f"[{stage} {action}" in line or (re.search(rf"(^|\s){stage}: ", line) and f"[{action}" in line):
                    actions[stage] = action
    return actions


def test_a_killed_pipeline_resumes_its_stage_and_a_config_change_reruns_only_what_follows(tmp_path,
                                                                                         tiny_models_cfg):
    run, log = tmp_path / "run", tmp_path / "first.log"
    argv = pipeline_argv(run, tiny_models_cfg.zoo_dir)
    with log.open("w") as handle:
        first = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 400
        while not list((run / "sft" / "ray" / "sft").glob("checkpoint_*")):
            assert first.poll() is None, f"the pipeline ended before SFT checkpointed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        kill_tree(first)
    assert not (run / "sft" / "_SUCCESS.json").exists(), "SFT finished before the kill: nothing was interrupted"
    assert (run / "rewards" / "_SUCCESS.json").exists()

    second = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout
    assert stage_actions(out) == {"corpus": "skipped", "data": "skipped", "rewards": "skipped", "sft": "resumed",
                                  "rm": "ran", "ppo": "ran", "eval": "ran"}, out
    sft = json.loads((run / "sft" / "manifest.json").read_text())
    assert sft["complete"] and sft["starts"][0] == 0 and sft["starts"][-1] > 0  # went on from a checkpoint
    metrics = pd.read_csv(run / "sft" / "metrics" / "metrics.csv")
    assert metrics["step"].tolist() == list(range(1, sft["total_steps"] + 1))  # every step logged exactly once
    pairs = pd.concat(pd.read_parquet(part) for part in (run / "data").glob("part-*.parquet"))
    assert pairs["pair_id"].is_unique
    # the summary of every stage, from the run directory
    assert "models: tiny zoo at" in out and "corpus: 60 rows" in out and "data: " in out
    assert "sft: " in out and "held-out loss" in out and "rm: shared_backbone" in out
    assert "ppo: 2/2 steps" in out and "held-out reward" in out
    assert "eval: 4 prompts (embedded) x 1 seeds" in out and f"report: {run / 'eval' / 'report.html'}" in out
    assert "examples (original -> sft -> ppo):" in out
    assert f"bp-ray serve --preset tiny --set output_dir={run}" in out
    results = json.loads((run / "eval" / "results.json").read_text())
    assert [row["system"] for row in results["table"]] == ["original", "tags", "sft", "ppo"]
    assert (run / "eval" / "plots" / "curves_ppo.png").exists() and (run / "eval" / "plots" / "curves_sft.png").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["corpus_rows"] == 60

    ppo_model = (run / "ppo" / "model" / "model.safetensors").stat().st_mtime_ns
    third = subprocess.run(pipeline_argv(run, tiny_models_cfg.zoo_dir, "ppo.total_steps=3"), capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert stage_actions(third.stdout) == {"corpus": "skipped", "data": "skipped", "rewards": "skipped",
                                           "sft": "skipped", "rm": "skipped", "ppo": "ran", "eval": "ran"}
    assert "ppo: 3/3 steps" in third.stdout
    assert (run / "ppo" / "model" / "model.safetensors").stat().st_mtime_ns != ppo_model

    status = subprocess.run([sys.executable, "-m", "bp_ray.cli", "status", str(run)], capture_output=True,
                            text=True, timeout=60)
    lines = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()}
    assert set(lines.values()) == {"done"} and len(lines) == 7, status.stdout
