"""A training stage under repeated faults: fitted again from its newest checkpoint while each failed fit moved it
forward, and failed for good when a fit gets nowhere (a deterministic crash must not loop)."""

from __future__ import annotations

import json

import pytest
from ray.train import TrainingFailedError

from bp_ray.train.loop import STATE_FILE, fit_while_progressing, latest_checkpoint_step


class Trainers:
    """A trainer factory whose fits fail (each after reaching a given checkpoint step) until one succeeds."""

    def __init__(self, steps_reached: list[int], succeed: bool):
        self.steps_reached, self.succeed, self.step, self.fits = list(steps_reached), succeed, -1, 0

    def __call__(self):
        return self

    def fit(self):
        self.fits += 1
        if self.steps_reached:
            self.step = self.steps_reached.pop(0)
            raise TrainingFailedError("worker died 4 times (max_failures 3)")
        if not self.succeed:
            raise TrainingFailedError("still failing")
        return "result"


def test_fits_again_while_each_failed_fit_checkpointed_further():
    trainers = Trainers([10, 25], succeed=True)
    assert fit_while_progressing(trainers, lambda: trainers.step, "sft") == "result"
    assert trainers.fits == 3


def test_a_fit_that_checkpoints_nothing_new_fails_the_stage():
    trainers = Trainers([10, 10], succeed=True)  # the second fit died before checkpointing past step 10
    with pytest.raises(TrainingFailedError):
        fit_while_progressing(trainers, lambda: trainers.step, "sft")
    assert trainers.fits == 2
    crash = Trainers([], succeed=False)  # fails from the start: one fit, no retry
    with pytest.raises(TrainingFailedError):
        fit_while_progressing(crash, lambda: crash.step, "ppo")
    assert crash.fits == 1


def test_latest_checkpoint_step_reads_the_run_folder(tmp_path):
    assert latest_checkpoint_step(str(tmp_path), "sft") == -1
    run = tmp_path / "sft"
    for folder, step in (("checkpoint_2026-12-06_05-00-01.000001", 8), ("checkpoint_2026-12-06_05-00-09.000001", 16)):
        (run / folder).mkdir(parents=True)
        (run / folder / STATE_FILE).write_text(json.dumps({"step": step, "total_steps": 40}))
    (run / "checkpoint_tmp_being_written").mkdir()  # no state file yet: not counted
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert latest_checkpoint_step(str(tmp_path), "sft") == 16
