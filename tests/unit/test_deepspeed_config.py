"""DeepSpeed config values for every stage / precision / scheduler, and the batch-split errors."""

from __future__ import annotations

import pytest

from bp_ray.config import DeepSpeedConfig
from bp_ray.train.deepspeed_config import deepspeed_config, micro_batch_size, warmup_steps_for


def make(ds: DeepSpeedConfig | None = None, *, batch: int = 32, world: int = 2, warmup: int = 3,
         total: int = 100, scheduler: str = "cosine") -> dict:
    return deepspeed_config(ds or DeepSpeedConfig(), batch, world, lr=2e-5, weight_decay=0.01,
                            warmup_steps=warmup, total_steps=total, lr_scheduler=scheduler)


def test_batch_split_optimizer_and_quiet_logging():
    cfg = make(DeepSpeedConfig(gradient_accumulation_steps=4, gradient_clipping=0.5), batch=32, world=2)
    # 32 = 2 workers x 4 accumulation steps x 4 per forward pass
    assert cfg["train_batch_size"] == 32
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-5, "weight_decay": 0.01,
                                                            "betas": [0.9, 0.999], "eps": 1e-8}}
    assert cfg["steps_per_print"] >= 10**6
    assert cfg["wall_clock_breakdown"] is False


@pytest.mark.parametrize(("precision", "bf16", "fp16"),
                         [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)])
def test_precision(precision, bf16, fp16):
    cfg = make(DeepSpeedConfig(precision=precision))
    assert cfg["bf16"] == {"enabled": bf16}
    assert cfg["fp16"] == {"enabled": fp16}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_without_offload(stage):
    assert make(DeepSpeedConfig(zero_stage=stage))["zero_optimization"] == {"stage": stage}


def test_a_cpu_model_steps_with_torch_adamw_unless_its_optimizer_is_offloaded():
    def params(**kwargs) -> dict:
        return deepspeed_config(kwargs.pop("ds", DeepSpeedConfig()), 32, 2, lr=2e-5, weight_decay=0.01,
                                warmup_steps=3, total_steps=100, lr_scheduler="cosine", **kwargs)["optimizer"]["params"]

    assert params(on_cpu=True)["torch_adam"] is True  # no C++ op to compile on first use
    assert params(on_cpu=True)["fused"] is True
    assert "torch_adam" not in params()  # GPU: DeepSpeed's fused kernel
    offloaded = DeepSpeedConfig(zero_stage=2, offload_optimizer=True)
    assert "torch_adam" not in params(ds=offloaded, on_cpu=True)  # ZeRO-Offload steps with DeepSpeedCPUAdam


def test_optimizer_offload_goes_to_cpu_and_needs_zero():
    cfg = make(DeepSpeedConfig(zero_stage=2, offload_optimizer=True))
    assert cfg["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        make(DeepSpeedConfig(zero_stage=0, offload_optimizer=True))


def test_schedulers_warm_up_linearly_then_decay():
    assert make(scheduler="cosine", warmup=3, total=100)["scheduler"] == {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": 100, "warmup_num_steps": 3, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0,
                   "warmup_type": "linear"}}
    assert make(scheduler="linear", warmup=3, total=100)["scheduler"] == {
        "type": "WarmupDecayLR",
        "params": {"total_num_steps": 100, "warmup_min_lr": 0.0, "warmup_max_lr": 2e-5, "warmup_num_steps": 3,
                   "warmup_type": "linear"}}
    assert make(scheduler="constant", warmup=3)["scheduler"] == {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-5, "warmup_num_steps": 3, "warmup_type": "linear"}}


def test_no_warmup_starts_at_the_peak_lr():
    # DeepSpeed rejects warmup_num_steps=0: a 1-step warm-up from the peak itself is flat.
    assert make(scheduler="cosine", warmup=0)["scheduler"]["params"]["warmup_min_ratio"] == 1.0
    linear = make(scheduler="linear", warmup=0)["scheduler"]["params"]
    assert (linear["warmup_num_steps"], linear["warmup_min_lr"], linear["warmup_max_lr"]) == (1, 2e-5, 2e-5)


def test_unknown_scheduler_is_rejected():
    with pytest.raises(ValueError, match="cosine, linear, constant"):
        make(scheduler="polynomial")


@pytest.mark.parametrize(("batch", "world", "accumulation"), [(10, 4, 1), (12, 2, 4), (2, 2, 2)])
def test_batch_that_does_not_split_evenly_is_rejected(batch, world, accumulation):
    # 10 / 4 and 12 / (2 x 4) are not whole; 2 / (2 x 2) < 1
    with pytest.raises(ValueError, match="positive multiple"):
        micro_batch_size(batch, world, accumulation)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        make(DeepSpeedConfig(gradient_accumulation_steps=accumulation), batch=batch, world=world)


@pytest.mark.parametrize(("total", "ratio", "expected"), [(100, 0.03, 3), (100, 0.07, 7), (10, 0.25, 3),
                                                          (10, 0.0, 0), (1, 0.01, 1)])
def test_warmup_steps_round_up(total, ratio, expected):
    # 10 x 0.25 = 2.5 -> 3; 100 x 0.07 is 7.000000000000001 in floats but must stay 7
    assert warmup_steps_for(total, ratio) == expected


def test_a_cpu_worker_asks_py_cpuinfo_once_for_every_engine_start(monkeypatch):
    """DeepSpeed's CPU Adam op reads the CPU's flags twice per engine; each read would spawn a subprocess."""
    import cpuinfo

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder.cpu import FusedAdamBuilder

    from bp_ray.config import TrainResources
    from bp_ray.train.loop import worker_device

    calls = []
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: calls.append(1) or {"arch": "X86_64", "flags": ["avx2"]})
    assert worker_device(TrainResources(num_workers=1, use_gpu=False)) == "cpu"
    for _ in range(2):  # two engines (PPO's policy and critic), two reads each
        assert "-D__AVX256__" in FusedAdamBuilder().cxx_args()
    assert len(calls) == 1


@pytest.mark.parametrize(("cpus", "threads"), [(1.0, 1), (1.5, 2), (2.0, 2), (0.25, 1)])
def test_a_cpu_worker_computes_with_as_many_threads_as_cpus_it_holds(monkeypatch, cpus, threads):
    """Workers start with OMP_NUM_THREADS=1; a worker that holds 2 CPUs must not train on one."""
    import torch

    from bp_ray.config import TrainResources
    from bp_ray.train.loop import worker_device

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    before = torch.get_num_threads()
    try:
        worker_device(TrainResources(num_workers=1, use_gpu=False, cpus_per_worker=cpus))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_a_cpu_worker_never_compiles_deepspeeds_shared_memory_all_reduce(monkeypatch):
    """DeepSpeed's CPU backend would build a C++ op with g++ at its first start on a machine (minutes on 2 cores,
    every other process waiting on its lock); training's collectives use gloo without it."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from bp_ray.config import TrainResources
    from bp_ray.train.loop import worker_device

    worker_device(TrainResources(num_workers=1, use_gpu=False))
    from deepspeed.comm.torch import build_shm_op

    assert build_shm_op() is None
