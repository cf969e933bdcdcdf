"""The main job submitted as users submit it: `ray job submit --working-dir . -- python jobs/pipeline.py` to a real
`ray start --head` on loopback with Ray's token authentication on; stopped mid-stage and resubmitted. The head's
processes are found by its private temp dir and stopped by PID."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from bp_ray.local_cluster import head_processes
from tests.integration.ray_train_faults import registered_checkpoint_step
from tests.integration.serve_process import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_head():
    # Short path: Ray's unix sockets live under the temp dir and their paths have a 107-byte limit.
    temp_dir = tempfile.mkdtemp(prefix="bpr-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard, gcs_port = free_port(), free_port()
    started = subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        # The head's daemons pass RAY_ADDRESS on to every worker they start: Ray Train's actors look their cluster
        # up by scanning this machine's Ray processes otherwise, and fail when a test running beside this one
        # (make test runs two) has a Ray of its own ("Found multiple active Ray instances").
        env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        processes = head_processes(temp_dir, gcs_port)
        for process in processes:
            process.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(processes, timeout=5)  # Ray's workers often ignore SIGTERM: measured 20 s
        for process in alive:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(head: dict, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`ray job COMMAND --address HEAD ARGS...` (the address before ARGS: after `--` it would join the entrypoint)."""
    return subprocess.run([RAY, "job", command, "--address", head["address"], *args], env=head["env"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def job_state(head: dict, job_id: str) -> str:
    """PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED, from `ray job status` (its output mixes the two streams)."""
    result = ray_job(head, "status", job_id)
    text = (result.stdout + result.stderr).upper()
    return next((s for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING") if s in text), "UNKNOWN")


SMALL = ["data.corpus_rows=60", "rm.epochs=1", "rm.heads=shared_backbone", "ppo.total_steps=2",
         "ppo.checkpoint_every=2", "ppo.rollout_batch_size=8", "ppo.eval_prompts=4", "eval.num_prompts=4",
         "eval.num_seeds=1", "eval.grid_prompts=2",
         # long enough (about 27 steps) to be stopped after its first checkpoint and before its end
         "sft.epochs=8", "sft.checkpoint_every=4"]


def submit_pipeline(head: dict, run: Path, zoo_dir: str, *extra: str) -> str:
    """`ray job submit --working-dir . -- python jobs/pipeline.py ...`; returns the submission id."""
    job_id = f"bp-ray-test-{secrets.token_hex(4)}"
    sets = [arg for item in (f"models.zoo_dir={zoo_dir}", *SMALL, *extra) for arg in ("--set", item)]
    submitted = ray_job(head, "submit", "--no-wait", "--submission-id", job_id, "--working-dir", ".",
                        "--runtime-env-json", json.dumps({"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}}), "--",
                        "python", "jobs/pipeline.py", "--preset", "tiny", "--out", str(run), *sets)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return job_id


def wait_for(head: dict, job_id: str, timeout_s: float = 600) -> tuple[str, str]:
    """(final state, logs) of a job."""
    deadline, state = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        state = job_state(head, job_id)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2)
    return state, ray_job(head, "logs", job_id).stdout


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def stage_actions(logs: str) -> dict[str, str]:
    """From the pipeline's summary: stage -> "skipped" / "ran" / "resumed"."""
    actions = {}
    # Workers' progress bars move the cursor with escape codes and may be drawn in front of a summary line.
    for line in ANSI.sub(" ", logs).replace("\r", "\n").splitlines():
        for stage in ("corpus", "data", "rewards", "sft", "rm", "ppo", "eval"):
            for action in ("skipped", "ran", "resumed"):
                # progress bars of Ray workers may be drawn in front of a summary line: search, don't anchor
                if f"[{stage} {action}" in line or (re.search(rf"(^|\s){stage}: ", line) and f"[{action}" in line):
                    actions[stage] = action
    return actions


@pytest.mark.timeout(1800)  # two whole pipeline jobs: 8 min alone on 2 cores, 17 beside another test process
def test_a_pipeline_job_stopped_mid_stage_and_resubmitted_loses_and_repeats_nothing(ray_head, tiny_models_cfg,
                                                                                   tmp_path):
    run = tmp_path / "run"
    first = submit_pipeline(ray_head, run, tiny_models_cfg.zoo_dir)
    # Registered, not merely written: a checkpoint folder appears before Ray Train's controller records it, and a
    # job stopped in between resumes from step 0. 15 min: on a loaded machine its data and rewards stages alone
    # took 4 (10 min failed it there).
    deadline, next_status = time.monotonic() + 900, time.monotonic() + 10
    while registered_checkpoint_step(run / "sft" / "ray" / "sft") == 0:
        assert time.monotonic() < deadline, ray_job(ray_head, "logs", first).stdout[-4000:]  # SFT never checkpointed
        if time.monotonic() > next_status:  # a job that ended early would otherwise be waited on in vain
            assert job_state(ray_head, first) in ("PENDING", "RUNNING"), wait_for(ray_head, first)[1][-4000:]
            next_status = time.monotonic() + 10
        time.sleep(0.2)
    stopped = ray_job(ray_head, "stop", first)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    state, _ = wait_for(ray_head, first, 60)
    assert state == "STOPPED"
    assert not (run / "sft" / "_SUCCESS.json").exists(), "SFT finished before the stop: nothing was interrupted"

    second = submit_pipeline(ray_head, run, tiny_models_cfg.zoo_dir)
    # sft, rm, ppo and eval: 4 min alone on 2 cores, over 10 beside another test process (3 min a training stage)
    state, logs = wait_for(ray_head, second, 1200)
    assert state == "SUCCEEDED", logs[-4000:]
    summary = [line for line in ANSI.sub(" ", logs).replace("\r", "\n").splitlines() if "[" in line and ": " in line]
    assert stage_actions(logs) == {"corpus": "skipped", "data": "skipped", "rewards": "skipped", "sft": "resumed",
                                   "rm": "ran", "ppo": "ran", "eval": "ran"}, "\n".join(summary)[-6000:]
    sft = json.loads((run / "sft" / "manifest.json").read_text())
    assert sft["complete"] and sft["starts"][0] == 0 and sft["starts"][-1] > 0  # went on from a checkpoint
    metrics = pd.read_csv(run / "sft" / "metrics" / "metrics.csv")
    assert metrics["step"].tolist() == list(range(1, sft["total_steps"] + 1))  # every step logged exactly once
    pairs = pd.concat(pd.read_parquet(part) for part in (run / "data").glob("part-*.parquet"))
    assert pairs["pair_id"].is_unique and len(pairs) == json.loads((run / "data" / "manifest.json").read_text())[
        "pairs_out"]
    # the job's own summary, fetched with `ray job logs`
    assert "ray: joined" in logs or "corpus: 60 rows" in logs
    for expected in ("corpus: 60 rows", "sft: ", "rm: shared_backbone", "ppo: 2/2 steps", "held-out reward",
                     "eval: 4 prompts (embedded) x 1 seeds", f"report: {run / 'eval' / 'report.html'}",
                     "examples (original -> sft -> ppo):", f"bp-ray serve --preset tiny --set output_dir={run}"):
        assert expected in logs, expected
    results = json.loads((run / "eval" / "results.json").read_text())
    assert [row["system"] for row in results["table"]] == ["original", "tags", "sft", "ppo"]
    assert_a_readable_console(logs, run)
    assert (run / "eval" / "plots" / "curves_ppo.png").exists() and (run / "eval" / "plots" / "curves_sft.png").exists()

    # Which stages a changed setting reruns is tested without Ray in tests/unit/test_pipeline_plan.py.
    assert f"{first}" in ray_job(ray_head, "list").stdout

    status_out = subprocess.run([sys.executable, "-m", "bp_ray.cli", "status", str(run)], capture_output=True,
                                text=True, timeout=60).stdout
    lines = {line.split()[0]: line.split()[1] for line in status_out.splitlines()}
    assert set(lines.values()) == {"done"} and len(lines) == 7, status_out


def assert_a_readable_console(logs: str, run: Path) -> None:
    """What the job printed: a line per stage and the summary, last and whole; the libraries' output (Ray, its
    workers, loading bars, DeepSpeed) is in the run's logs/ instead."""
    # `ray job logs` and Ray's job supervisor add their own lines (coloured, before the job starts): not the job's.
    lines = [line for line in logs.rstrip("\n").splitlines() if "cli.py:" not in line and "job_manager.py:" not in line]
    logs = "\n".join(lines)
    assert len(lines) <= 40, logs  # about 700 before the console was quiet
    for junk in ("State API", "Loading weights", "Loading pipeline components", "Execution plan", "%|", "pid=",
                 "real_accelerator", "\r", "\x1b["):
        assert junk not in logs, junk
    for stage, outcome in (("corpus", "skipped"), ("sft", "resumed, done in"), ("ppo", "done in"),
                           ("eval", "done in")):
        assert re.search(rf"^{stage} +{re.escape(outcome)}", logs, re.MULTILINE), stage
    assert lines[-2].startswith("done in ") and lines[-1].startswith("serve the trained beautifier: "), lines[-3:]
    assert lines[-3].startswith(f"logs: {run / 'logs'} (")
    output, python_log = (run / "logs" / "output.log").read_text(), (run / "logs" / "bp-ray.log").read_text()
    assert "RayTrainWorker pid=" in output  # worker output, forwarded by Ray to the driver, prefixed by Ray
    assert "pipeline plan: corpus skip" in python_log


def test_the_head_refuses_a_client_with_a_wrong_token(ray_head):
    env = {**ray_head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    refused = subprocess.run([RAY, "job", "list", "--address", ray_head["address"]], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "token authentication is enabled" in refused.stdout + refused.stderr
