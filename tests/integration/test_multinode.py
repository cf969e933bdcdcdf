"""The data job on a real multi-node Ray cluster built on this machine (`bp_ray/local_cluster.py`): a head and
worker raylets with a custom resource standing in for GPU node types. Each scenario runs in its own process,
because it owns its own Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def run_scenario(scenario: str, out, zoo_dir: str, rows: int = 240) -> dict:
    result = subprocess.run([sys.executable, "-m", "bp_ray.local_cluster", scenario, str(out), "--zoo-dir", zoo_dir,
                             "--rows", str(rows)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def assert_every_pair_exactly_once(report: dict) -> None:
    check = report["check"]
    assert check["committed_unique"] and check["all_committed"] and check["output_unique"], check
    assert check["pairs_out"] > 0


def test_pools_spread_over_the_worker_nodes_and_survive_a_node_leaving_and_one_joining(tiny_models_cfg, tmp_path):
    report = run_scenario("churn", tmp_path, tiny_models_cfg.zoo_dir)
    assert [e.split()[0] for e in report["events"]] == ["removed", "added"], report["events"]
    assert_every_pair_exactly_once(report)
    used = {node for placed in report["actors_on"].values() for node in placed}
    # spread over both first workers (never the head: no CPU, no gpu_node), then onto the node that joined
    assert used == {"worker-1", "worker-2", "worker-3"}, report["actors_on"]
    assert {cls.split("(")[-1].rstrip(")") for cls in report["actors_on"]} == {"Captioner", "PromptRewriter"}


# 2,400 rows, 2-3 min: the churn scenario above also puts pools' actors on a node that joined mid-job; this one
# shows a pool growing past its size there. `make test-all` runs it.
@pytest.mark.slow
def test_a_pool_grows_onto_a_node_that_joins_mid_job(tiny_models_cfg, tmp_path):
    # enough rows that the bottleneck pool still has queued work when the node has joined and its actor started
    report = run_scenario("grow", tmp_path, tiny_models_cfg.zoo_dir, rows=2400)
    assert [e.split()[0] for e in report["events"]] == ["added"], report
    assert_every_pair_exactly_once(report)
    sizes = report["pool_sizes"]
    # each pool starts at min_actors (1): the first node has one slot per pool
    assert all(size["before_join"] <= 1 for size in sizes.values()), report
    assert any(size["after_join"] > size["before_join"] for size in sizes.values()), report
    assert any("worker-2" in nodes for nodes in report["actors_on"].values()), report
