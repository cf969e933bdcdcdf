"""deepspeed.initialize accepts our config on CPU (gloo, world size 1) for ZeRO 0-3, and the lr warms up.

DeepSpeed is prepared as the training workers prepare it (`prepare_cpu_deepspeed`): no C++ op is compiled, so the
first run on a machine takes seconds too.
"""

from __future__ import annotations

import math
import socket

import pytest
import torch

from bp_ray.config import DeepSpeedConfig
from bp_ray.train.deepspeed_config import deepspeed_config

pytestmark = pytest.mark.integration

LR = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deepspeed_cpu():
    """deepspeed imported on the CPU accelerator with a 1-process gloo group, torn down after the module."""
    with pytest.MonkeyPatch.context() as mp:
        # DS_ACCELERATOR is read once, when deepspeed first picks its accelerator.
        mp.setenv("DS_ACCELERATOR", "cpu")
        from bp_ray.train.loop import prepare_cpu_deepspeed

        prepare_cpu_deepspeed()
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            mp.setenv(key, value)
        deepspeed = pytest.importorskip("deepspeed")
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            pytest.skip("deepspeed already chose a non-CPU accelerator earlier in this session")
        created = not torch.distributed.is_initialized()
        deepspeed.init_distributed(dist_backend="gloo")
        yield deepspeed
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_initialize_and_warm_up_on_cpu(deepspeed_cpu, stage):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ds = DeepSpeedConfig(zero_stage=stage, precision="fp32", gradient_accumulation_steps=1)
    cfg = deepspeed_config(ds, global_batch_size=4, world_size=1, lr=LR, weight_decay=0.0, warmup_steps=2,
                           total_steps=10, lr_scheduler="cosine", on_cpu=True)
    engine, _, _, _ = deepspeed_cpu.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x, y = torch.randn(4, 4), torch.randn(4, 1)

    def step() -> float:
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        return loss.item()

    # DeepSpeed's linear warm-up gives lr = LR * k / warmup at scheduler iteration k, and the scheduler sits at
    # iteration k - 1 after k optimizer steps (before the first step it reports its start, 0): so the first
    # TWO optimizer steps run at lr 0 (they only fill Adam's moments), and the third at LR / 2. Cosine decay
    # then starts one step past the peak: iteration 2 is 1 of the 10 - 2 decay steps, LR * (1 + cos(pi / 8)) / 2.
    lrs = [engine.get_lr()[0]]
    losses = []
    for _ in range(3):
        losses.append(step())
        lrs.append(engine.get_lr()[0])
    assert engine.global_steps == 3
    assert lrs == pytest.approx([0.0, 0.0, LR / 2, LR * (1 + math.cos(math.pi / 8)) / 2])
    assert losses[0] == losses[1] == losses[2]  # lr 0: the weights have not moved yet
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(engine(x), y).item() < losses[2]  # the step at LR / 2 trained
