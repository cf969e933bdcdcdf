"""The shared Ray Train + DeepSpeed loop: ZeRO stages 1-3 with two workers, resume equals an uninterrupted run,
and a killed worker is replaced and the run goes on from its last checkpoint."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from bp_ray.config_loader import load_config
from bp_ray.train.sft import run_sft
from tests.integration.ray_train_faults import worker_killer
from tests.integration.train_inputs import corpus_pairs, model_weights


def sft_run(cfg, *args, **kwargs) -> dict:
    return run_sft(cfg.sft, cfg.models, cfg.cluster, *args, **kwargs)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    return corpus_pairs(tmp_path_factory.mktemp("pairs"), rows=600)


def sft_cfg(zoo_dir: str, *overrides: str):
    return load_config("tiny", [f"models.zoo_dir={zoo_dir}", "sft.lr=3e-3", "sft.eval_fraction=0.1",
                                *overrides])


# ZeRO-2 on two workers is the tiny preset's setting: test_ppo's two-worker test runs it. ZeRO-3 partitions the
# weights themselves, so its export is the one that must gather; test_deepspeed_smoke starts every stage 0-3.
@pytest.mark.parametrize("stage", [3])
def test_zero_stages_train_with_two_workers(ray_session, tiny_models_cfg, pairs_dir, tmp_path, stage):
    cfg = sft_cfg(tiny_models_cfg.zoo_dir, f"sft.deepspeed.zero_stage={stage}", "sft.resources.num_workers=2",
                  "sft.epochs=0.2", "sft.checkpoint_every=3")
    manifest = run_sft(cfg.sft, cfg.models, cfg.cluster, pairs_dir, tmp_path / "sft")
    assert manifest["complete"] and manifest["workers"] == 2 and manifest["zero_stage"] == stage
    assert manifest["steps"] == manifest["total_steps"] >= 4
    trained = model_weights(tmp_path / "sft")
    base = load_file(Path(tiny_models_cfg.zoo_dir) / "tiny" / "bloom" / "model.safetensors")
    # ZeRO-3 partitions every weight across the two ranks: the export must gather full tensors that moved.
    for name, tensor in base.items():
        assert trained[name].shape == tensor.shape, name
    assert any(not torch.equal(trained[name], base[name]) for name in base)
    assert manifest["final_metrics"]["loss/eval"] < 20


def test_stopped_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(ray_session, tiny_models_cfg,
                                                                              pairs_dir, tmp_path):
    common = ("sft.epochs=0.5", "sft.checkpoint_every=4")
    out = tmp_path / "sft"
    whole = sft_run(sft_cfg(tiny_models_cfg.zoo_dir, *common), pairs_dir, out)
    expected = model_weights(out)

    # Same folder, no --resume: Ray Train would restore the finished run by its name unless bp-ray forgets it.
    first = sft_run(sft_cfg(tiny_models_cfg.zoo_dir, *common, "sft.stop_after_step=8"), pairs_dir, out)
    assert first["starts"] == [0], "a run without --resume must not restore the earlier checkpoints"
    assert first["steps"] == 8 and not first["complete"]
    assert not (out / "_SUCCESS.json").exists()
    second = sft_run(sft_cfg(tiny_models_cfg.zoo_dir, *common), pairs_dir, out, resume=True)
    assert second["complete"] and second["starts"] == [0, 8]
    assert second["steps"] == whole["steps"] > 8

    got = model_weights(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert second["final_metrics"]["loss/train"] == pytest.approx(whole["final_metrics"]["loss/train"], rel=1e-4)


def test_a_killed_worker_is_replaced_and_training_goes_on_from_the_last_checkpoint(ray_session, tiny_models_cfg,
                                                                                  pairs_dir, tmp_path):
    out = tmp_path / "sft"
    cfg = sft_cfg(tiny_models_cfg.zoo_dir, "sft.epochs=1", "sft.checkpoint_every=10",
                  "sft.resources.num_workers=2")
    with worker_killer(out / "ray" / "sft", after_step=10) as killed:
        manifest = run_sft(cfg.sft, cfg.models, cfg.cluster, pairs_dir, out)
    assert killed, "no Ray Train worker was found to kill"
    assert manifest["complete"] and manifest["steps"] == manifest["total_steps"]
    starts = manifest["starts"]
    assert len(starts) >= 2 and starts[0] == 0, starts
    assert all(step > 0 and step % 10 == 0 for step in starts[1:]), starts
    logged = pd.read_csv(out / "metrics" / "metrics.csv")["step"].tolist()
    assert logged == list(range(1, manifest["total_steps"] + 1)), "each step logged once across the restart"


def test_a_run_that_cannot_fit_the_local_ray_fails_clearly(ray_session, tiny_models_cfg, pairs_dir, tmp_path):
    cfg = sft_cfg(tiny_models_cfg.zoo_dir, "sft.resources.num_workers=3")  # the test Ray has 2 CPUs
    with pytest.raises(RuntimeError, match="needs 3 CPUs and 0 GPUs, but this local Ray has 2 CPUs"):
        run_sft(cfg.sft, cfg.models, cfg.cluster, pairs_dir, tmp_path / "sft")
