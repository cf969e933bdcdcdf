"""The shared Ray Train + DeepSpeed loop: ZeRO stages 1-3 with two workers, resume equals an uninterrupted run,
and a killed worker is replaced and the run goes on from its last checkpoint."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from safetensors.torch import load_file

from bp_ray.config import load_config
from bp_ray.train.sft import run_sft
from tests.integration.train_inputs import corpus_pairs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    return corpus_pairs(tmp_path_factory.mktemp("pairs"), rows=600)


def sft_cfg(zoo_dir: str, *overrides: str):
    return load_config("tiny", [f"models.zoo_dir={zoo_dir}", "sft.lr=3e-3", "sft.eval_fraction=0.1",
                                *overrides])


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_with_two_workers(ray_session, tiny_models_cfg, pairs_dir, tmp_path, stage):
    cfg = sft_cfg(tiny_models_cfg.zoo_dir, f"sft.deepspeed.zero_stage={stage}", "sft.resources.num_workers=2",
                  "sft.epochs=0.2", "sft.checkpoint_every=3")
    manifest = run_sft(cfg, pairs_dir, tmp_path / "sft")
    assert manifest["complete"] and manifest["workers"] == 2 and manifest["zero_stage"] == stage
    assert manifest["steps"] == manifest["total_steps"] >= 4
    trained = weights(tmp_path / "sft")
    base = load_file(Path(tiny_models_cfg.zoo_dir) / "tiny" / "bloom" / "model.safetensors")
    # ZeRO-3 partitions every weight across the two ranks: the export must gather full tensors that moved.
    for name, tensor in base.items():
        assert trained[name].shape == tensor.shape, name
    assert any(not torch.equal(trained[name], base[name]) for name in base)
    assert manifest["final_metrics"]["loss/eval"] < 20


def test_stopped_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(ray_session, tiny_models_cfg,
                                                                              pairs_dir, tmp_path):
    common = ("sft.epochs=0.5", "sft.checkpoint_every=4")
    whole = run_sft(sft_cfg(tiny_models_cfg.zoo_dir, *common), pairs_dir, tmp_path / "whole")

    first = run_sft(sft_cfg(tiny_models_cfg.zoo_dir, *common, "sft.stop_after_step=8"), pairs_dir, tmp_path / "split")
    assert first["steps"] == 8 and not first["complete"]
    assert not (tmp_path / "split" / "_SUCCESS.json").exists()
    second = run_sft(sft_cfg(tiny_models_cfg.zoo_dir, *common), pairs_dir, tmp_path / "split", resume=True)
    assert second["complete"] and second["starts"] == [0, 8]
    assert second["steps"] == whole["steps"] > 8

    expected, got = weights(tmp_path / "whole"), weights(tmp_path / "split")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert second["final_metrics"]["loss/train"] == pytest.approx(whole["final_metrics"]["loss/train"], rel=1e-4)

    fresh = run_sft(sft_cfg(tiny_models_cfg.zoo_dir, *common, "sft.stop_after_step=4"), pairs_dir,
                    tmp_path / "split")
    assert fresh["starts"] == [0], "a run without --resume must not restore the earlier checkpoints"


def train_worker_pids() -> set[int]:
    """PIDs of processes that hold a Ray Train worker actor (Ray renames a pooled worker process when it does)."""
    return {process.pid for process in psutil.process_iter(["cmdline"])
            if "RayTrainWorker" in " ".join(process.info["cmdline"] or [])}


def registered_checkpoint_step(run_dir: Path) -> int:
    """Step of the latest checkpoint the Ray Train controller has registered (what a restarted group gets).

    A report reaches the controller only at its next poll of the workers, so a worker killed right after
    reporting could restart from the checkpoint before; the controller's snapshot file says what it holds."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return 0


def test_a_killed_worker_is_replaced_and_training_goes_on_from_the_last_checkpoint(ray_session, tiny_models_cfg,
                                                                                  pairs_dir, tmp_path):
    out = tmp_path / "sft"
    cfg = sft_cfg(tiny_models_cfg.zoo_dir, "sft.epochs=3", "sft.checkpoint_every=10",
                  "sft.resources.num_workers=2")
    killed: list[int] = []
    earlier = train_worker_pids()  # an earlier test's workers may still be exiting

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if registered_checkpoint_step(out / "ray" / "sft") >= 10 and (pids := train_worker_pids() - earlier):
                victim = max(pids)
                psutil.Process(victim).send_signal(signal.SIGKILL)
                killed.append(victim)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    manifest = run_sft(cfg, pairs_dir, out)
    killer.join(timeout=5)
    assert killed, "no Ray Train worker was found to kill"
    assert manifest["complete"] and manifest["steps"] == manifest["total_steps"]
    starts = manifest["starts"]
    assert len(starts) >= 2 and starts[0] == 0, starts
    assert all(step > 0 and step % 10 == 0 for step in starts[1:]), starts
    logged = pd.read_csv(out / "metrics" / "metrics.csv")["step"].tolist()
    assert logged == list(range(1, manifest["total_steps"] + 1)), "each step logged once across the restart"
