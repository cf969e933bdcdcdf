"""The pipeline's console: a line per stage, progress from other processes through a file, library output and
logging captured into <run>/logs/, the summary's counts of truncated prompts. No Ray."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from bp_ray.console import (
    OUTPUT_LOG,
    PROGRESS_ENV,
    PYTHON_LOG,
    Console,
    StepProgress,
    format_bar,
    pipeline_console,
    report_progress,
)
from bp_ray.layout import RunLayout
from bp_ray.summaries import stage_outcome, truncation_summary


def test_a_plain_console_prints_one_line_per_stage_and_no_redraws():
    out = io.StringIO()
    console = Console(out)
    console.start("data")
    console.finish("data", "done in 17.0 s")
    console.print("summary")
    console.close()
    assert out.getvalue() == "data      done in 17.0 s\nsummary\n"


def test_the_live_bar_follows_the_progress_files_and_is_cleared_before_a_line(tmp_path, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, str(tmp_path))
    out = io.StringIO()
    console = Console(out, live=True, progress_dir=tmp_path)
    console.start("sft")
    bar = StepProgress("sft", total=40, initial=10)
    bar.set_description("sft loss 2.345")
    bar.update(10)
    assert console.progress_text().startswith(f"sft       {format_bar(20, 40)} 20/40 steps  loss 2.345  ")
    console.finish("sft", "done in 3.0 s")
    console.close()
    text = out.getvalue()
    assert text.endswith("\r\x1b[Ksft       done in 3.0 s\n")  # the bar is wiped, not left under the line


def test_a_stale_report_of_an_earlier_stage_is_not_shown(tmp_path):
    console = Console(io.StringIO(), progress_dir=tmp_path)
    console.start("rm")
    (tmp_path / "stage.json").write_text(json.dumps({"done": 5, "total": 5, "unit": "rows", "note": "", "time": 0}))
    assert "running" in console.progress_text()


def test_runs_side_by_side_add_up_on_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, str(tmp_path))
    console = Console(io.StringIO(), progress_dir=tmp_path)
    console.start("rm")
    for head, done in (("pickscore", 30), ("aesthetic", 10)):
        bar = StepProgress(f"rm:{head}", total=90)
        bar.set_description(f"rm:{head} loss 0.1")
        bar.update(done)
    assert console.progress_text().startswith(
        f"rm        {format_bar(40, 180)} 40/180 steps  aesthetic loss 0.1, pickscore loss 0.1  ")


def test_report_progress_is_a_no_op_outside_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    report_progress(1, 2)
    assert list(tmp_path.iterdir()) == []


def test_a_sub_run_keeps_its_name_in_the_note(tmp_path, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, str(tmp_path / "p.json"))
    bar = StepProgress("rm:pickscore", total=4)
    bar.set_description("rm:pickscore loss 0.5")
    assert bar.note == "pickscore loss 0.5"


def test_a_failed_stage_says_so_on_its_line():
    out = io.StringIO()
    console = Console(out)
    console.start("ppo")
    console.fail(RuntimeError("no reward\nsecond line"))
    console.close()
    assert out.getvalue().startswith("ppo       failed: RuntimeError: no reward after ")


def test_the_quiet_console_sends_library_output_and_logging_to_the_run_logs(tmp_path):
    # A subprocess: the capture works on file descriptors 1 and 2, which pytest holds in this process.
    script = f"""
import logging, os, sys, warnings
from pathlib import Path
from bp_ray.console import pipeline_console
logging.basicConfig(level=logging.INFO)
with pipeline_console(Path({str(tmp_path)!r}), verbose=False) as (console, counter):
    os.write(1, b"native write\\n")
    os.write(2, b"native error\\n")
    print("a library's print")
    print("a bar", file=sys.stderr)
    logging.getLogger("transformers").warning("a library warning")
    logging.getLogger("bp_ray.data").info("a stage's info")
    warnings.warn("a python warning")
    console.print(f"summary: {{counter.count}} warnings")
print("after the block")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "summary: 2 warnings\nafter the block\n"
    assert done.stderr == ""
    output = (tmp_path / "logs" / OUTPUT_LOG).read_text()
    for text in ("native write", "native error", "a library's print", "a bar"):
        assert text in output
    python_log = (tmp_path / "logs" / PYTHON_LOG).read_text()
    for text in ("a library warning", "a stage's info", "a python warning"):
        assert text in python_log
    assert not (tmp_path / "logs" / "progress").exists()


def test_verbose_leaves_the_console_alone_and_still_writes_the_log(tmp_path, capsys):
    root = logging.getLogger()
    before = list(root.handlers)
    with pipeline_console(tmp_path, verbose=True) as (console, counter):
        assert PROGRESS_ENV not in os.environ  # training keeps its tqdm_ray bars
        console.print("summary")
        logging.getLogger("bp_ray.test").warning("shown")
    assert capsys.readouterr().out == "summary\n"
    assert "shown" in (tmp_path / "logs" / PYTHON_LOG).read_text() and counter.count == 1
    assert root.handlers == before


def test_stage_outcomes():
    run = SimpleNamespace
    assert stage_outcome(run(stage="data", action="ran", manifest={}, seconds=17.04)) == "done in 17.0 s"
    assert stage_outcome(run(stage="sft", action="resumed", manifest={"complete": True}, seconds=2)) == \
        "resumed, done in 2.0 s"
    assert stage_outcome(run(stage="sft", action="ran", manifest={"complete": False, "steps": 4, "total_steps": 9},
                             seconds=2)) == "stopped at 4/9 steps after 2.0 s (go on with --resume)"
    assert stage_outcome(run(stage="rm", action="skipped", manifest={}, seconds=0)).startswith("skipped")


def test_truncated_prompts_are_counted_from_the_rewards_manifest_and_the_eval_results(tmp_path):
    layout = RunLayout(tmp_path)
    assert truncation_summary(layout) is None
    layout.stage_dir("rewards").mkdir(parents=True)
    layout.manifest("rewards").write_text(json.dumps(
        {"long_prompts": {"mode": "truncate", "limit_tokens": 77, "prompts": 212, "over_limit": 3}}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"long_prompts": {
        "mode": "truncate", "limit_tokens": 77,
        "systems": {"original": {"over_limit": 0}, "sft": {"over_limit": 2}, "ppo": {"over_limit": 4}}}}))
    line = truncation_summary(layout)
    assert line.startswith("9 prompts truncated at 77 tokens")
    assert "3 of 212 reward prompts" in line and "sft 2, ppo 4" in line and "original" not in line
    # chunked rendering encodes long prompts whole: nothing was cut
    layout.manifest("rewards").write_text(json.dumps(
        {"long_prompts": {"mode": "chunked", "limit_tokens": 77, "prompts": 212, "over_limit": 3}}))
    assert truncation_summary(layout).startswith("6 prompts truncated")


def test_the_rm_line_calls_the_style_heads_error_a_brier_score():
    from bp_ray.summaries import rm_summary

    fit = {"mse": 0.0122, "mean_baseline_mse": 0.2191, "pearson": 0.97, "spearman": 0.85}
    style = {"final_metrics": {**{f"rm/style/{k}": v for k, v in fit.items()}, "rm/style/accuracy": 0.988,
                               "rm/style/majority_accuracy": 0.676, "rm/style/auc": 0.999},
             "complete": True, "target": "style", "label_rows": 3000}
    line = rm_summary(style, tmp := Path("rm"))
    assert "style: held-out Brier 0.0122 vs predict-the-mean 0.2191" in line and "AUC 0.999" in line
    images = {"final_metrics": {f"rm/aesthetic/{k}": v for k, v in fit.items()}, "complete": True,
              "heads": "aesthetic", "label_rows": 80}
    assert "aesthetic: held-out MSE 0.0122" in rm_summary(images, tmp)
