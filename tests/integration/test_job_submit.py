"""A stage submitted as users submit it: `ray job submit --working-dir .` to a real `ray start --head` on loopback,
with Ray's token authentication on. The head's processes are found by its private temp dir and stopped by PID."""

from __future__ import annotations

import json
import os
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

from tests.integration.serve_process import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _head_processes(temp_dir: str) -> list[psutil.Process]:
    """Every process of the head we started: each has our private temp dir on its command line."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.fixture(scope="module")
def ray_head():
    # Short path: Ray's unix sockets live under the temp dir and their paths have a 107-byte limit.
    temp_dir = tempfile.mkdtemp(prefix="bpr-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    started = subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        processes = _head_processes(temp_dir)
        for process in processes:
            process.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(processes, timeout=20)
        for process in alive:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(head: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args, "--address", head["address"]], env=head["env"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_a_stage_submitted_with_ray_job_submit_runs_on_the_head_and_its_logs_come_back(ray_head, tiny_models_cfg,
                                                                                        tmp_path):
    out = tmp_path / "run" / "data"
    job_id = f"bp-ray-test-{secrets.token_hex(4)}"
    runtime_env = {"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}}
    submitted = ray_job(ray_head, "submit", "--no-wait", "--submission-id", job_id, "--working-dir", ".",
                        "--runtime-env-json", json.dumps(runtime_env), "--", "python", "jobs/generate_data.py",
                        "--preset", "tiny", "--set", "data.corpus_rows=40",
                        "--set", f"models.zoo_dir={tiny_models_cfg.zoo_dir}", "--out", str(out))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline, status = time.monotonic() + 400, ""
    while time.monotonic() < deadline:
        status = ray_job(ray_head, "status", job_id).stdout
        if any(state in status for state in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(2)
    logs = ray_job(ray_head, "logs", job_id).stdout
    assert "SUCCEEDED" in status, status + logs[-3000:]
    assert "ray: joined" in logs or "data: " in logs
    assert f"-> {out}" in logs  # the stage's own summary line, from the job's driver on the head
    manifest = json.loads((out / "manifest.json").read_text())
    pairs = pd.concat(pd.read_parquet(part) for part in out.glob("part-*.parquet"))
    assert len(pairs) == manifest["pairs_out"] > 0 and pairs["pair_id"].is_unique
    listed = ray_job(ray_head, "list").stdout
    assert job_id in listed


def test_the_head_refuses_a_client_with_a_wrong_token(ray_head):
    env = {**ray_head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    refused = subprocess.run([RAY, "job", "list", "--address", ray_head["address"]], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or "nauthori" in refused.stdout + refused.stderr
