"""The DeepSpeed config dict each training stage passes to `deepspeed.initialize(config=...)`.

Steps here are optimizer steps (one per global batch, after gradient accumulation): DeepSpeed steps its LR
scheduler once per optimizer step.
"""

from __future__ import annotations

import math

from bp_ray.config import DeepSpeedConfig

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
LR_SCHEDULERS = ("cosine", "linear", "constant")
QUIET_STEPS_PER_PRINT = 10**9
"""DeepSpeed prints its own progress every this many steps: never, bp-ray logs one line per interval itself."""


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up optimizer steps: ceil(total_steps * warmup_ratio)."""
    # Round first: 100 * 0.07 is 7.000000000000001 in floats, which must not become 8 steps.
    return math.ceil(round(total_steps * warmup_ratio, 9))


def micro_batch_size(global_batch_size: int, world_size: int, gradient_accumulation_steps: int) -> int:
    """Examples per worker per forward pass: global batch / (workers * accumulation steps), exactly."""
    per_step = world_size * gradient_accumulation_steps
    if global_batch_size % per_step or global_batch_size < per_step:
        raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of workers "
                         f"({world_size}) x gradient_accumulation_steps ({gradient_accumulation_steps}) = "
                         f"{per_step}; change batch_size, resources.num_workers or "
                         "deepspeed.gradient_accumulation_steps")
    return global_batch_size // per_step


def lr_scheduler_config(name: str, lr: float, warmup_steps: int, total_steps: int) -> dict:
    """DeepSpeed scheduler block: linear warm-up from 0 to lr over warmup_steps, then cosine / linear decay to 0
    at total_steps, or constant."""
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {name!r}; choose one of: {', '.join(LR_SCHEDULERS)}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    # DeepSpeed rejects warmup_num_steps=0 (and clamps to >= 2): no warm-up is expressed instead as a warm-up
    # that starts at the peak lr, which leaves the lr flat at lr through DeepSpeed's 2-step minimum.
    start_ratio = 0.0 if warmup_steps > 0 else 1.0
    warmup = {"warmup_num_steps": max(1, warmup_steps), "warmup_type": "linear"}  # DeepSpeed's default is log
    if name == "cosine":
        return {"type": "WarmupCosineLR",
                "params": {"total_num_steps": total_steps, "warmup_min_ratio": start_ratio, "cos_min_ratio": 0.0,
                           **warmup}}
    params = {"warmup_min_lr": start_ratio * lr, "warmup_max_lr": lr, **warmup}
    if name == "linear":
        return {"type": "WarmupDecayLR", "params": {"total_num_steps": total_steps, **params}}
    return {"type": "WarmupLR", "params": params}


def deepspeed_config(ds: DeepSpeedConfig, global_batch_size: int, world_size: int, lr: float, weight_decay: float,
                     warmup_steps: int, total_steps: int, lr_scheduler: str, on_cpu: bool = False) -> dict:
    """A config for `deepspeed.initialize`: batch split, ZeRO stage (+ CPU optimizer offload), precision, AdamW and
    the warm-up + decay lr schedule.

    on_cpu (the model trains on the CPU, no offload): torch's AdamW instead of DeepSpeed's FusedAdam, which on the
    CPU accelerator is a C++ op compiled on first use in every new environment (3 min on 2 cores, holding a lock
    that every other training process on the machine waits on) for the same update, in torch's fused kernel (one op
    over all parameters rather than a loop: a third of the step of a small model)."""
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1 (ZeRO-Offload partitions "
                         "optimizer states)")
    zero: dict = {"stage": ds.zero_stage}
    torch_adam = on_cpu and not ds.offload_optimizer  # offload steps with DeepSpeedCPUAdam, which is its point
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(global_batch_size, world_size,
                                                           ds.gradient_accumulation_steps),
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "optimizer": {"type": "AdamW",
                      "params": {"lr": lr, "weight_decay": weight_decay, "betas": list(ADAM_BETAS),
                                 "eps": ADAM_EPS, **({"torch_adam": True, "fused": True} if torch_adam else {})}},
        "scheduler": lr_scheduler_config(lr_scheduler, lr, warmup_steps, total_steps),
        "steps_per_print": QUIET_STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
