"""The training loop SFT and the reward models share: DeepSpeed inside Ray Train workers, checkpoints, resume.

A stage builds a `TrainTask` inside each worker (its model, examples, loss, evaluation and how to write the model in
Hugging Face format) and calls `train_on_worker`; the driver calls `fit` and then `export_model`. Step s always
trains on the same examples (the epoch order is a function of the seed and the epoch), so a run restored from a
checkpoint, by `--resume` or by Ray Train after a worker died, continues exactly where the stopped one was.

A checkpoint folder holds:
    model/               the model in Hugging Face format (`save_pretrained`, safetensors) + its tokenizer
    deepspeed/state/     DeepSpeed's optimizer, scheduler and (ZeRO-partitioned) weights, one shard per rank
    rng/rank-<r>.pt      each rank's torch RNG state (dropout, sampling)
    trainer_state.json   the step, the metrics at that step, and the step every attempt started from
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bp_ray.config import ClusterConfig, TrainingConfig, TrainResources
from bp_ray.layout import write_manifest

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
DS_DIR = "deepspeed"
DS_TAG = "state"
RNG_DIR = "rng"
MODEL_DIR = "model"


@dataclass
class TrainTask:
    """What a stage plugs into the loop; built inside every worker, identically on every rank."""

    model: Any
    """torch.nn.Module on this worker's device, in train mode."""
    examples: Sequence[Any]
    """Training examples; a step takes `batch_size` of them, each rank its share."""
    loss: Callable[[Any, list[Any]], tuple[Any, int]]
    """(engine, examples) -> (scalar loss tensor, tokens in the batch)."""
    evaluate: Callable[[Any], dict[str, float]]
    """engine -> held-out metrics; runs on every rank (ZeRO-3 forward passes are collective)."""
    save_model: Callable[[Path, dict | None], None]
    """(folder, state_dict or None) -> write the model in Hugging Face format; rank 0 only. The state dict is
    the gathered one under ZeRO-3, None otherwise (the module's own weights are complete)."""


def total_steps_for(num_examples: int, batch_size: int, epochs: float) -> tuple[int, int]:
    """(steps per epoch, total steps); the last partial batch of an epoch is dropped."""
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_examples} training examples are fewer than one batch of batch_size={batch_size}")
    return steps_per_epoch, max(1, round(epochs * steps_per_epoch))


def save_checkpoint(engine: Any, write_models: Callable[[Path, dict | None], None], state: dict[str, Any], rank: int,
                    zero_stage: int) -> Path:
    """Write this worker's part of a checkpoint to a fresh temporary folder and return it; rank 0 writes the models
    (`write_models(folder, state_dict)`) and the trainer state."""
    import torch

    folder = Path(tempfile.mkdtemp(prefix="bp-ray-ckpt-"))
    engine.save_checkpoint(str(folder / DS_DIR), tag=DS_TAG)  # collective: every rank writes its shards
    (folder / RNG_DIR).mkdir()
    torch.save(torch.get_rng_state(), folder / RNG_DIR / f"rank-{rank}.pt")
    # ZeRO-3 partitions the weights: gathering them is collective too, so every rank calls it.
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank == 0:
        write_models(folder, state_dict)
        (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


def restore_checkpoint(engine: Any, folder: Path, rank: int) -> dict[str, Any]:
    """Load a checkpoint's DeepSpeed state and this rank's RNG into the running worker; returns the trainer state."""
    import torch

    engine.load_checkpoint(str(folder / DS_DIR), tag=DS_TAG)
    rng = folder / RNG_DIR / f"rank-{rank}.pt"
    if rng.exists():  # absent when the world size changed: the order of the data does not depend on it
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((folder / STATE_FILE).read_text())


def train_on_worker(task: TrainTask, stage: TrainingConfig, metrics_dir: Path, name: str) -> None:
    """Run (or go on with) the training of one stage on this Ray Train worker."""
    import deepspeed
    import ray.train

    from bp_ray.train.deepspeed_config import deepspeed_config, warmup_steps_for
    from bp_ray.train.metrics import MetricsWriter
    from bp_ray.train.sft_data import batches_for_rank, epoch_order

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    steps_per_epoch, total_steps = total_steps_for(len(task.examples), stage.batch_size, stage.epochs)
    ds_config = deepspeed_config(stage.deepspeed, stage.batch_size, world, stage.lr, stage.weight_decay,
                                 warmup_steps_for(total_steps, stage.warmup_ratio), total_steps, stage.lr_scheduler,
                                 on_cpu=next(task.model.parameters()).device.type == "cpu")
    engine, *_ = deepspeed.initialize(model=task.model, model_parameters=task.model.parameters(), config=ds_config)

    state: dict[str, Any] = {"step": 0, "metrics": {}, "starts": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = restore_checkpoint(engine, Path(folder), rank)
    state["starts"] = [*state.get("starts", []), state["step"]]
    start_step = state["step"]
    end_step = min(total_steps, stage.stop_after_step) if stage.stop_after_step else total_steps
    writer = MetricsWriter(metrics_dir, enabled=rank == 0, start_step=start_step)
    progress = progress_bar(name, total_steps, start_step) if rank == 0 else None

    for step in range(start_step, end_step):
        started = time.perf_counter()
        epoch, index = divmod(step, steps_per_epoch)
        mine = batches_for_rank(epoch_order(len(task.examples), epoch, stage.seed), stage.batch_size, rank,
                                world)[index]
        lr = float(engine.get_lr()[0])  # before the step: the rate this step's update uses
        losses, tokens = [], 0
        for micro in np.array_split(mine, stage.deepspeed.gradient_accumulation_steps):
            loss, micro_tokens = task.loss(engine, [task.examples[i] for i in micro])
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the update only at the accumulation boundary
            losses.append(float(loss))
            tokens += micro_tokens
        metrics = {"loss/train": float(np.mean(losses)), "lr": lr,
                   "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                   "perf/tokens_per_s": tokens * world / (time.perf_counter() - started),
                   "time/step_s": time.perf_counter() - started}
        done = step + 1
        checkpoint_now = done % stage.checkpoint_every == 0 or done == end_step
        if checkpoint_now:
            metrics.update(task.evaluate(engine))
        # The step's row before its checkpoint: a worker killed after the controller took the checkpoint but before
        # the row would resume after the step and never log it; killed before the checkpoint, it resumes from the
        # one before, and the writer drops the rows past that.
        log_step(writer, progress, done, metrics, f"{name} loss {metrics['loss/train']:.3f}")
        if checkpoint_now:
            # Every rank reports at the same steps: ray.train.report is a collective in Ray Train.
            state.update(step=done, metrics=metrics, total_steps=total_steps)
            folder = save_checkpoint(engine, lambda root, weights: task.save_model(root / MODEL_DIR, weights), state,
                                     rank, stage.deepspeed.zero_stage)
            report_checkpoint(folder, metrics, done)
    finish_logs(writer, progress)


def report_checkpoint(folder: Path, metrics: dict[str, float], step: int) -> None:
    """Report metrics with this rank's checkpoint folder (Ray Train copies it to storage), then drop the folder."""
    import ray.train

    ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
    shutil.rmtree(folder, ignore_errors=True)


def log_step(writer: Any, progress: Any, step: int, metrics: dict[str, float], description: str) -> None:
    """One metrics row (rank 0 writes; other ranks' writers are disabled) and one tick of the driver's bar."""
    writer.log(step, metrics)
    if progress is not None:
        progress.set_description(description)
        progress.update(1)


def finish_logs(writer: Any, progress: Any) -> None:
    writer.close()
    if progress is not None:
        progress.close()


def progress_bar(name: str, total: int, initial: int) -> Any:
    """The steps of a training run on the driver's console: through the pipeline console's progress file inside
    `bp-ray pipeline`, else a tqdm_ray bar (Ray draws the bars of remote workers on the driver)."""
    from bp_ray.console import StepProgress, progress_enabled

    if progress_enabled():
        # tqdm_ray patches print() on the driver to redraw its bars after every line, the summary's too.
        return StepProgress(name, total, initial)
    from ray.experimental import tqdm_ray

    bar = tqdm_ray.tqdm(total=total, desc=name, unit="step")
    bar.update(initial)
    return bar


def worker_device(resources: TrainResources) -> str:
    """This worker's device; must run before DeepSpeed is imported (it picks its accelerator at import)."""
    if resources.use_gpu:
        import ray.train.torch

        return str(ray.train.torch.get_device())
    prepare_cpu_deepspeed()
    import torch

    # Workers start with OMP_NUM_THREADS=1 (ray_runtime.WORKER_ENV): a CPU worker computes on the cores it holds.
    torch.set_num_threads(max(1, math.ceil(resources.cpus_per_worker)))
    return "cpu"


def prepare_cpu_deepspeed() -> None:
    """DeepSpeed on the CPU accelerator, without its two start-up costs on a 2-core machine (below); call before
    deepspeed is first imported."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _cache_cpu_info()
    _skip_shm_comm_op()


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op with g++ the first time a process on a
    machine starts it (over 3 min on 2 cores beside the test suite, seen in CI), and every other process waits on
    its lock. Only DeepSpeed's inference all-reduce uses it; ZeRO's training collectives go through gloo either
    way. Marked incompatible, it is never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _cache_cpu_info() -> None:
    """DeepSpeed's CPU optimizer op asks py-cpuinfo for the CPU twice at every engine start, and py-cpuinfo
    answers by running a Python subprocess each time (measured: 1.1 s per call, 2.2 s of a 3.2 s engine start).
    The answer cannot change within a process, so it is computed once per worker."""
    import functools

    import cpuinfo

    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


# --- driver side ------------------------------------------------------------------------------------------------

def _storage(cluster: ClusterConfig, out_dir: Path, stage: str) -> tuple[str, str]:
    """(storage path, run name) of a stage's Ray Train run: <out>/ray/<stage>, or a name unique to out_dir under
    the shared cluster.storage_path (several runs may share one bucket)."""
    if not cluster.storage_path:
        return str(out_dir / "ray"), stage
    return cluster.storage_path, f"{stage}-{hashlib.sha1(str(out_dir).encode()).hexdigest()[:10]}"


def _forget_run(storage: str, name: str) -> None:
    """A fresh (not --resume) run must not restore an earlier run's checkpoints: Ray Train restores by name."""
    import pyarrow.fs

    fs, path = _run_folder(storage, name)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


def _run_folder(storage: str, name: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of a Ray Train run's folder in storage (a local path or a URI)."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage) if "://" in storage else (pyarrow.fs.LocalFileSystem(),
                                                                                 storage)
    return fs, f"{root.rstrip('/')}/{name}"


def worker_gpus(resources: TrainResources) -> float:
    """GPUs all of a stage's workers hold together."""
    return resources.num_workers * resources.gpus_per_worker if resources.use_gpu else 0.0


def latest_checkpoint_step(storage: str, name: str) -> int:
    """The step of the newest checkpoint a Ray Train run holds in storage (-1: none yet)."""
    import pyarrow.fs

    fs, run = _run_folder(storage, name)
    if fs.get_file_info(run).type == pyarrow.fs.FileType.NotFound:
        return -1
    steps = [-1]
    for info in fs.get_file_info(pyarrow.fs.FileSelector(run)):
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            try:
                with fs.open_input_stream(f"{info.path}/{STATE_FILE}") as f:
                    steps.append(int(json.loads(f.read())["step"]))
            except (OSError, ValueError, KeyError):  # a checkpoint still being written, or an unrelated folder
                continue
    return max(steps)


def fit_while_progressing(make_trainer: Callable[[], Any], checkpoint_step: Callable[[], int], stage: str) -> Any:
    """trainer.fit(), fitted again from the newest checkpoint while each failed fit had moved it forward.

    Ray Train's max_failures counts every worker failure of a run; under repeated faults (a preempted node, a
    killed worker every half minute) a long stage spends them while still making progress. A fit that fails
    after checkpointing further is resumed; one that fails with no new checkpoint (a deterministic crash) raises."""
    from ray.train import TrainingFailedError

    before = checkpoint_step()
    while True:
        try:
            return make_trainer().fit()
        except TrainingFailedError:
            after = checkpoint_step()
            if after <= before:
                raise
            logger.warning("%s: Ray Train gave up after repeated worker failures, but checkpointed step %d since "
                           "its last start (was %d); resuming from there", stage, after, before)
            before = after


def fit(cluster: ClusterConfig, stage: str, worker_fn: Callable[[dict], None],
        loop_config: dict[str, Any] | Callable[[], dict[str, Any]], resources: TrainResources, out_dir: Path,
        resume: bool) -> tuple[Path, dict[str, Any], str]:
    """Run worker_fn on Ray Train workers; returns (latest checkpoint folder, its trainer state, storage).

    loop_config may be a function, called before each fit (see fit_while_progressing): a stage whose workers use
    actors of its own (PPO) starts fresh ones there, since a fit that gave up may have worn out their restarts.
    The checkpoint folder is a local copy the caller may read until the next call."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from bp_ray.ray_runtime import init_ray, require_resources

    storage, name = _storage(cluster, out_dir, stage)
    if not resume:
        _forget_run(storage, name)
    init_ray(cluster)
    require_resources(cluster, resources.num_workers * resources.cpus_per_worker, worker_gpus(resources),
                      f"{stage} ({resources.num_workers} workers)")
    def trainer() -> TorchTrainer:
        return TorchTrainer(
            worker_fn,
            train_loop_config=loop_config() if callable(loop_config) else loop_config,
            torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                resources_per_worker={"CPU": resources.cpus_per_worker,
                                      **({"GPU": resources.gpus_per_worker} if resources.use_gpu else {})}),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=resources.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))

    result = fit_while_progressing(trainer, lambda: latest_checkpoint_step(storage, name), stage)
    if result.checkpoint is None:
        raise RuntimeError(f"{stage} finished without a checkpoint: {result.error}")
    local = Path(tempfile.mkdtemp(prefix=f"bp-ray-{stage}-"))
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(folder, local, dirs_exist_ok=True)
    return local, json.loads((local / STATE_FILE).read_text()), f"{storage}/{name}"


def export_model(checkpoint: Path, out_dir: Path) -> Path:
    """Copy the checkpoint's Hugging Face model to out_dir/model (replacing an older one)."""
    target = out_dir / MODEL_DIR
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(checkpoint / MODEL_DIR, target)
    return target


def finish_stage(stage: str, out_dir: Path, checkpoint: Path, state: dict[str, Any], manifest: dict[str, Any],
                 started: float) -> dict[str, Any]:
    """Export the model, write the manifest, and mark the stage done only when it ran to its last step."""
    complete = state["step"] >= state["total_steps"]
    manifest = {"stage": stage, "model": str(export_model(checkpoint, out_dir)), "steps": state["step"],
                "total_steps": state["total_steps"], "complete": complete, "starts": state["starts"],
                "final_metrics": state["metrics"], **manifest,
                "wall_time_s": round(time.perf_counter() - started, 2)}
    shutil.rmtree(checkpoint, ignore_errors=True)
    return write_manifest(out_dir, manifest)
