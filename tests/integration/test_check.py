"""`bp-ray check` end to end: the paper preset on a machine without the hub, DiffusionDB or a cluster fails in
seconds naming each; the tiny preset on a local Ray passes; a node that cannot read the storage is named."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BP_RAY = str(Path(sys.executable).parent / "bp-ray")  # the console script beside this interpreter
NOBODY = "127.0.0.1:9"
"""Port 9 (discard) on loopback: nothing listens there on these machines."""
HUB_MODELS = ("bigscience/bloom-1b1", "Salesforce/blip-image-captioning-large",
              "stable-diffusion-v1-5/stable-diffusion-v1-5", "yuvalkirstain/PickScore_v1",
              "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "openai/clip-vit-large-patch14")


def check(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess, float]:
    # An empty Hugging Face cache and a hub nobody answers at: the same answer with or without internet.
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://{NOBODY}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    done = subprocess.run([BP_RAY, "check", *argv], capture_output=True, text=True, env=env, timeout=120)
    return done, time.perf_counter() - start


def lines_of(report: str) -> dict[str, tuple[str, str]]:
    """what -> (status, detail), from the report's columns (the header says where they start)."""
    lines = report.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("what "))
    status_at, detail_at = lines[header].index("status"), lines[header].index("detail")
    return {line[:status_at].strip(): (line[status_at:detail_at].strip(), line[detail_at:])
            for line in lines[header + 1:-1]}


@pytest.mark.parametrize("prompts", [None, "no-such-diffusiondb"])
def test_paper_offline_names_every_missing_model_and_the_prompt_data(tmp_path, prompts):
    # cluster.address=auto would join any Ray running on this machine (other tests start some): point it at
    # nobody so that the answer is the same everywhere.
    argv = ["--preset", "paper", "--set", f"cluster.address={NOBODY}", "--out", str(tmp_path / "run")]
    if prompts:
        argv += ["--prompts", str(tmp_path / prompts)]
    done, seconds = check(tmp_path, *argv)
    assert done.returncode == 1, done.stdout + done.stderr
    assert seconds < 45, f"{seconds:.1f} s"  # ~2 s on an idle 2-core machine
    assert "Traceback" not in done.stderr
    rows = lines_of(done.stdout)
    missing = {what: detail for what, (status, detail) in rows.items() if status == "MISSING"}
    for model in HUB_MODELS:
        assert any(detail.startswith(f"{model}: not in the local Hugging Face cache") for detail in missing.values()), \
            model
    assert rows["models: hub"][0] == "WARN" and f"http://{NOBODY} unreachable" in rows["models: hub"][1]
    if prompts:
        assert f"prompt source not found: {tmp_path / prompts}" in missing["data.source"]
    else:
        assert "data.source is not set" in missing["data.source"] and "--prompts" in missing["data.source"]
    assert "nothing answers there" in missing["cluster"] and "ray start --head" in missing["cluster"]


def test_tiny_on_a_local_ray_has_everything(ray_session, tmp_path):
    # The session's local Ray, joined by address: what a stage does under `ray job submit`, without starting
    # another Ray (seconds) for the check.
    address = ray_session.get_runtime_context().gcs_address
    zoo = tmp_path / "zoo"
    done, seconds = check(tmp_path, "--preset", "tiny", "--set", f"cluster.address={address}", "--set",
                          f"models.zoo_dir={zoo}", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = lines_of(done.stdout)
    assert {status for status, _ in rows.values()} == {"OK"}, done.stdout
    assert rows["cluster"][1].startswith(f"joined {address}: 1 node, 2 CPUs, 0 GPUs")
    assert "1 node: shared trivially" in rows["storage: output_dir"][1]
    assert not zoo.exists() and not (tmp_path / "run").exists()  # nothing built, nothing written
    assert seconds < 60, f"{seconds:.1f} s"


def test_a_node_that_cannot_read_the_storage_is_named(ray_session, tmp_path):
    from bp_ray.preflight import ClusterNode, ClusterView, nodes_not_seeing, shared_path_check

    node = ray_session.nodes()[0]
    real = ClusterNode(node["NodeID"], node["NodeManagerAddress"], node["Resources"])
    probe = tmp_path / "probe"
    probe.write_text("token")
    assert nodes_not_seeing(probe, "token", [real]) == []  # pinned to the node, read back
    assert nodes_not_seeing(probe, "other", [real]) == [real.ip]
    # A node id no node has: its task cannot run, as on a node that is gone; it is named by its IP.
    gone = ClusterNode(("1" if real.node_id[0] == "0" else "0") + real.node_id[1:], "10.0.0.99", {"CPU": 1.0})
    assert nodes_not_seeing(probe, "token", [real, gone], timeout_s=10) == ["10.0.0.99"]
    check = shared_path_check("storage: output_dir", str(tmp_path / "run"),
                              ClusterView("", True, {"CPU": 2.0}, [real, gone]))
    assert check.status == "MISSING" and "node(s) 10.0.0.99 cannot read a file written here" in check.detail
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe"]  # its own probe file removed
