"""The paper preset's stages at their real batch sizes on ONE GPU, measured side by side in one run.

On a GPU machine without the hub (the paper's checkpoints cannot be downloaded), the models are the shapes zoo:
the paper's architectures at their real sizes with random weights (bp_ray/embedded/shapes_zoo.py), built here
first, so what is measured is the paper's compute, memory and token counts (BLOOM-1b1 at all 24 layers, SD 1.5,
PickScore's CLIP ViT-H/14, the LAION aesthetic predictor on CLIP ViT-L/14); the outputs themselves mean nothing.

    python benchmarks/gpu_paper.py [--sections sd,score,sft,ppo] [--quick] [--json FILE] [--set KEY=VALUE ...]
    python benchmarks/gpu_paper.py --smoke      # the same code on the tiny preset, CPU, tiny counts (~2 min here)

Sections, each timed, printed as it finishes and guarded (a failure prints its error line, the others still run):
  build  resolve the zoo roles the chosen sections use (`paper-shapes` with models.zoo.shapes.lm_layers=0: the whole
         BLOOM-1b1), in parallel processes; prints each role's build seconds (0 when cached).
  sd     SD 1.5, 512x512, 20 steps, euler_ancestral, fp16: one prompt x 8 seeds in ONE batched pipeline call against
         8 single-seed calls with the same seeds (one torch.Generator per seed), one warm-up call of each first.
  score  PickScore and the aesthetic predictor on those 8 images, and on the scorer pool's batch (64 in the paper).
  sft    `run_sft` (Ray Train + DeepSpeed ZeRO-2, bf16, 1 GPU worker) at the paper's batch 16 and max_length 384,
         a few steps on synthetic pairs whose targets fill max_length; median tokens/s and s/step after step 1.
  ppo    `run_ppo` with the paper's settings (rollout 128, minibatch 16, 256 new tokens, 4 PPO epochs, separate
         critic, learned reward) for 2-3 iterations on one GPU worker, the reference and reward actors on the same
         GPU (ppo.actor_gpus=0.2 each); samples/s and the generate / reward / update seconds, median after the first.
The summary table puts each figure beside the paper's own setup (4 GPUs, DeepSpeed ZeRO-2): the paper reports no
throughput, so that column is a projection (4 x this GPU for the data-parallel stages), never a measurement.
Figures, versions, the GPU and each section's peak GPU memory go to $OUT/gpu_paper.json when OUT is set and to
--json FILE when given, rewritten after every section (a run cut off keeps what it measured); the table also goes to
$OUT/gpu_paper.txt.

Expected wall time on one H200 (16 cores), 9 min in all, zoo build included (`--quick`: about 7):
build ~1 min, sd ~40 s, score ~20 s, sft ~2.5 min (DeepSpeed builds its FusedAdam op on first use, ~1 min, and the
~17 GB checkpoint of the final step is written and copied twice), ppo ~4 min (four models load, one greedy
evaluation before and after, ~30 s an iteration, a ~34 GB checkpoint).

How to run it: from the repository root, in the project's environment (`make install` makes .venv; on a machine
without a package registry the same packages must already be there), e.g.

    .venv/bin/python benchmarks/gpu_paper.py

With this project's `run` device tool, the command is `PYTHONUNBUFFERED=1 OUT=$OUT python benchmarks/gpu_paper.py`
from the repository root. That machine has no registry, so `make install` cannot run there, and its image (torch
2.11, transformers 5.17) lacks ray, deepspeed, diffusers and open_clip: they travel as wheels (the device README
says how; then `PYTHONPATH=.:/tmp/site`). Ray's manylinux wheel is 79 MB, over the tool's 64 MiB carry, so the
sft and ppo sections need it sent in parts over two calls; `--sections sd,score` runs without Ray or DeepSpeed.
The zoo and every output go under --work-dir (/tmp/bp-ray-gpu-paper) with BP_RAY_CACHE=<work-dir>/cache, so
nothing depends on a cache from before; checkpoints are deleted after each section.

What differs from a cluster run, for one GPU: the paper preset gives each Ray Train worker 0.75 of a GPU and one
reference or reward actor the rest (ppo.resources.gpus_per_worker, ppo.actor_gpus); here one worker holds what two
actors at 0.2 leave (gpus_per_worker = 0.6). Ray Train does not retry a failed worker (resources.max_failures=0:
a benchmark reports the failure rather than repeat it). PPO's SFT policy is the zoo's BLOOM itself and its reward
models untrained heads on it (no SFT or RM run first).
When the disk cannot hold a checkpoint twice, Ray Train's storage moves to /dev/shm; when neither holds PPO's, it
runs with value_model=shared, and the summary says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bp_ray.config import PipelineConfig
from bp_ray.config_loader import load_config
from bp_ray.data import columns as C
from bp_ray.dry_run import count_parameters

SECTIONS = ("sd", "score", "sft", "ppo")
EXPECTED_S = {"build": 60, "sd": 40, "score": 20, "sft": 150, "ppo": 240}
"""Expected wall seconds of each section on one H200 (see the module docstring for what each includes)."""
ROLES = {"sd": ("diffusion",), "score": ("pickscore", "pickscore_processor", "aesthetic"), "sft": ("policy",),
         "ppo": ("policy", "rm_backbone")}
"""The `models.*` roles each section loads (the learned reward needs no CLIP: ppo.relevance_coef is 0)."""
PROMPT = "a lighthouse on a cliff at dawn, oil painting, highly detailed, dramatic light, by greg rutkowski"
MODEL_NAMES = {"shapes:sd": "SD 1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5": "SD 1.5",
               "shapes:pickscore": "PickScore ViT-H/14", "yuvalkirstain/PickScore_v1": "PickScore ViT-H/14",
               "shapes:aesthetic": "aesthetic ViT-L/14 + MLP", "shapes:bloom": "BLOOM-1b1",
               "bigscience/bloom-1b1": "BLOOM-1b1"}
"""What the summary calls a model spec (the paper preset's hub ids and their shapes-zoo stand-ins); others as given."""
PAPER_GPUS = 4
"""BeautifulPrompt was trained on 4 GPUs with DeepSpeed ZeRO-2 (Cao et al. 2023); it reports no throughput."""
BYTES_PER_TRAINED_PARAM = 16
"""A ZeRO-2 bf16 checkpoint: bf16 weights (2) + fp32 master, Adam m and v (12) + the Hugging Face export (2)."""
LABEL_MEANS = {"pickscore": 20.0, "aesthetic": 5.0}
"""Standardisation means of the untrained reward heads (the scorers' usual ranges; any value would do)."""
GIB = 2**30


@dataclass
class Plan:
    """What this run does: the preset, device and counts (`--smoke` shrinks them)."""

    preset: str
    device: str
    base: list[str]
    sections: list[str]
    seeds: int
    sft_steps: int
    ppo_iterations: int
    actor_gpus: float
    critic: str
    smoke: bool
    work: Path
    json: Path | None = None

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def config(self, *overrides: str) -> PipelineConfig:
        # The user's --set come last (in base): they win over the section's own settings.
        return load_config(self.preset, [*self.section_defaults, *overrides, *self.base])

    @property
    def section_defaults(self) -> list[str]:
        # A failed worker is reported, not retried: a retry would spend the benchmark's time budget again.
        sets = [f"models.device={self.device}", "sft.resources.max_failures=0", "ppo.resources.max_failures=0"]
        if self.preset.endswith("shapes"):
            sets.append("models.zoo.shapes.lm_layers=0")  # all 24 layers of BLOOM-1b1 (the preset keeps 2, for CPUs)
        return sets


@dataclass
class Report:
    """Everything measured, written as JSON after every section."""

    meta: dict[str, Any]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    destinations: list[Path] = field(default_factory=list)

    def write(self, summary: dict[str, Any] | None = None) -> None:
        payload = {"meta": self.meta, "sections": self.sections, **({"summary": summary} if summary else {})}
        for path in self.destinations:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload, indent=1, default=str))


# --- helpers ------------------------------------------------------------------------------------------------------

def say(text: str) -> None:
    print(text, flush=True)


def error_line(error: BaseException) -> str:
    """An error in one line: its type and the last `XxxError: ...` line of its message (for a Ray Train run, the
    worker's own error under Ray's `WorkerGroupError: Training failed due to worker errors:`)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b[^:]*:", line)]
    text = causes[-1] if causes else (lines[0] if lines else "")
    return f"{type(error).__name__}: {text}"[:500]


def model_name(spec: str) -> str:
    if spec.startswith("https://") and "aesthetic" in spec:
        return MODEL_NAMES["shapes:aesthetic"]
    return MODEL_NAMES.get(spec, spec)


def billions(params: int) -> str:
    return f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """(fn(), wall seconds), the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


class DeviceMemory:
    """Peak GPU memory over a block: this process's (torch.cuda.max_memory_allocated) and the whole device's, all
    processes (Ray workers and actors) included, from cudaMemGetInfo sampled every `interval` s in a thread."""

    def __init__(self, enabled: bool, interval: float = 0.25):
        self.enabled = enabled
        self.interval = interval
        self.baseline = self.peak = self.process_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def used() -> int:
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.used())

    def __enter__(self) -> DeviceMemory:
        if self.enabled:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.baseline = self.peak = self.used()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            import torch

            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.used())
            self.process_peak = torch.cuda.max_memory_allocated()

    def figures(self) -> dict[str, float]:
        if not self.enabled:
            return {}
        return {"gpu_device_peak_gib": round(self.peak / GIB, 2),
                "gpu_device_before_gib": round(self.baseline / GIB, 2),
                "gpu_process_peak_gib": round(self.process_peak / GIB, 2)}


def environment(plan: Plan) -> dict[str, Any]:
    """GPU, library versions and the run's settings."""
    import torch

    versions = {}
    for package in ("torch", "diffusers", "transformers", "deepspeed", "ray", "open_clip_torch", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    meta: dict[str, Any] = {"versions": versions, "python": sys.version.split()[0], "preset": plan.preset,
                            "device": plan.device, "sections": plan.sections, "overrides": plan.base,
                            "seeds": plan.seeds, "sft_steps": plan.sft_steps, "ppo_iterations": plan.ppo_iterations,
                            "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if plan.gpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / GIB, 1),
                       "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                       "cuda": torch.version.cuda, "driver": _driver_version()}
    return meta


def _driver_version() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def synthetic_pairs(count: int, high_words: int, seed: int = 7) -> pd.DataFrame:
    """Pair table (pair_id, low, high) from the embedded corpus: low = a prompt's subject (before its first comma),
    high = the prompt with the style tags of the prompts after it appended until it has `high_words` words."""
    from bp_ray.data.corpus import generate_prompts

    prompts = [p for p in generate_prompts(count * 2 + 200, seed=seed) if isinstance(p, str) and p.strip()]
    tags = [tag.strip() for p in prompts for tag in p.split(",")[1:] if tag.strip()] or ["highly detailed"]
    lows, highs, cursor = [], [], 0
    for i in range(count):
        prompt = prompts[i % len(prompts)]
        parts, words = [prompt], len(prompt.split())
        while words < high_words:
            tag = tags[cursor % len(tags)]
            cursor += 1
            parts.append(tag)
            words += len(tag.split())
        lows.append(prompt.split(",")[0].strip())
        highs.append(", ".join(parts))
    return pd.DataFrame({C.PAIR_ID: [f"bench{i:05d}" for i in range(count)], C.LOW: lows, C.HIGH: highs})


def untrained_reward_models(cfg: PipelineConfig, folder: Path) -> Path:
    """A reward-model folder laid out as `run_rm` writes it (<name>/model with reward_head.json, manifest.json), each
    model the RM backbone's files (linked, not copied) under a fresh regression head: what run_rm starts its first
    step from. PPO's reward actor loads it through LearnedReward.load, its real path; what it predicts means nothing,
    which a throughput benchmark does not need (and it saves training two 1.1B models for two 17 GB checkpoints)."""
    from bp_ray.layout import MANIFEST
    from bp_ray.models.loading import resolve_model
    from bp_ray.models.reward_heads import HeadSpec
    from bp_ray.train.reward import head_inputs, model_groups

    backbone = Path(resolve_model(cfg.models.rm_backbone, cfg.models))
    shutil.rmtree(folder, ignore_errors=True)
    groups = model_groups(cfg.rm)
    for name, heads in groups.items():
        model_dir = folder / name / "model"
        model_dir.mkdir(parents=True)
        for path in backbone.iterdir():
            if path.is_file():
                (model_dir / path.name).symlink_to(path.resolve())
        HeadSpec(heads=list(heads), inputs=head_inputs(cfg.rm, list(heads)), mean=[LABEL_MEANS[h] for h in heads],
                 std=[1.0] * len(heads)).save(model_dir)
    manifest = {"stage": "rm", "heads": cfg.rm.heads, "alpha": cfg.rewards.alpha, "max_length": cfg.rm.max_length,
                "models": {name: f"{name}/model" for name in groups}, "complete": True, "backbone": str(backbone),
                "note": "benchmarks/gpu_paper.py: untrained heads on the backbone (throughput only)"}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def checkpoint_room(trained_params: int, work: Path) -> tuple[str | None, str]:
    """Where the final checkpoint of a Ray Train stage fits: (cluster.storage_path, note); storage_path "" keeps the
    default (<out>/ray, on disk), None means it fits nowhere.

    The loop writes the checkpoint to a temporary folder, Ray Train copies it to storage, then the driver copies it
    back to a temporary folder to export the model: two copies on the disk at once, unless storage is in memory."""
    size = trained_params * BYTES_PER_TRAINED_PARAM
    disk = shutil.disk_usage(tempfile.gettempdir()).free
    work_free = shutil.disk_usage(work).free
    if min(disk, work_free) >= 2.1 * size:
        return "", ""
    shm = Path("/dev/shm")
    if disk >= 1.1 * size and shm.is_dir() and shutil.disk_usage(shm).free >= 1.1 * size:
        return str(shm / "bp-ray-gpu-paper"), (f"Ray Train storage in /dev/shm: a {size / GIB:.0f} GiB checkpoint "
                                               f"twice does not fit the {disk / GIB:.0f} GiB free on disk")
    return None, f"a {size / GIB:.0f} GiB checkpoint needs {2.1 * size / GIB:.0f} GiB, {disk / GIB:.0f} GiB free"


def steady_metrics(metrics_dir: Path, columns: list[str]) -> tuple[dict[str, float], int]:
    """Median of each column over the logged steps after the first (all of them when there is one), and the rows."""
    path = metrics_dir / "metrics.csv"
    if not path.exists():
        path = sorted(metrics_dir.glob("*.csv"))[0]
    frame = pd.read_csv(path)
    steady = frame.iloc[1:] if len(frame) > 1 else frame
    return {column: float(steady[column].median()) for column in columns if column in steady}, len(frame)


# --- sections -----------------------------------------------------------------------------------------------------

def _build_one(preset: str, overrides: list[str], role: str, threads: int) -> dict[str, Any]:
    """In a child process: build (or find cached) one shapes-zoo role; its ZooSummary as a dict."""
    import torch

    from bp_ray.embedded.shapes_zoo import build_shapes_role, shapes_dir

    torch.set_num_threads(threads)
    models = load_config(preset, overrides).models
    summary = build_shapes_role(shapes_dir(models) / role, role, models.zoo["shapes"])
    return {"role": role, "built": summary.built, "seconds": round(summary.seconds, 1),
            "gib": round(summary.bytes / GIB, 2), "parameters": int(sum(summary.parameters.values()))}


def section_build(plan: Plan) -> dict[str, Any]:
    """Resolve the models of the chosen sections: shapes-zoo roles in parallel processes (one per role, the cores
    shared), any other spec (tiny zoo, a folder) in this process."""
    from bp_ray.models.loading import resolve_model

    cfg = plan.config()
    specs = [spec for spec in dict.fromkeys(getattr(cfg.models, role) for s in plan.sections for role in ROLES[s])
             if spec]  # an empty pickscore_processor means the PickScore model's own
    shapes = [spec.split(":", 1)[1] for spec in specs if spec.startswith("shapes:")]
    roles: dict[str, Any] = {}
    if shapes:
        threads = max(1, (os.cpu_count() or 1) // len(shapes))
        overrides = [*plan.section_defaults, *plan.base]
        with ProcessPoolExecutor(len(shapes), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_build_one, plan.preset, overrides, role, threads) for role in shapes]
            for future in as_completed(futures):
                got = future.result()
                roles[got["role"]] = got
                say(f"  shapes:{got['role']:<10} {'built' if got['built'] else 'cached'} in {got['seconds']:6.1f} s"
                    f"  {got['parameters'] / 1e9:.3f} B parameters, {got['gib']:.1f} GiB")
    for spec in specs:
        if not spec.startswith("shapes:"):
            start = time.perf_counter()
            resolve_model(spec, cfg.models)
            roles[spec] = {"seconds": round(time.perf_counter() - start, 1)}
            say(f"  {spec:<16} resolved in {roles[spec]['seconds']:.1f} s")
    return {"roles": roles, "zoo_dir": os.environ.get("BP_RAY_CACHE", "")}


def section_sd(plan: Plan, state: dict[str, Any]) -> dict[str, Any]:
    """One prompt x N seeds: one batched pipeline call against N single-seed calls (one warm-up call each first)."""
    from bp_ray.models.loading import load_diffusion
    from bp_ray.rewards.render import render_seeds, seeds_for

    cfg = plan.config()
    render = cfg.data.render
    seeds = seeds_for(plan.seeds, cfg.rewards.seed_base)
    with DeviceMemory(plan.gpu) as memory:
        pipe, load_s = timed(lambda: load_diffusion(cfg.models.diffusion, cfg.models, plan.device, cfg.models.dtype,
                                                    render.scheduler), plan.device)
        _, warm_batched_s = timed(lambda: render_seeds(pipe, [PROMPT], seeds, render), plan.device)
        _, warm_single_s = timed(lambda: render_seeds(pipe, [PROMPT], seeds[:1], render), plan.device)
        pixels, batched_s = timed(lambda: render_seeds(pipe, [PROMPT], seeds, render), plan.device)
        _, separate_s = timed(lambda: [render_seeds(pipe, [PROMPT], [seed], render) for seed in seeds], plan.device)
        dtype = str(pipe.unet.dtype).removeprefix("torch.")
    state["pixels"] = pixels[0]  # (S, H, W, 3): the score section's images
    images = len(seeds)
    return {"model": cfg.models.diffusion, "image_size": render.height, "steps": render.num_inference_steps,
            "scheduler": render.scheduler, "guidance_scale": render.guidance_scale, "dtype": dtype, "seeds": images,
            "load_s": round(load_s, 1),
            "warmup_batched_s": round(warm_batched_s, 2), "warmup_single_s": round(warm_single_s, 2),
            "batched_s": round(batched_s, 3), "separate_s": round(separate_s, 3),
            "batched_images_per_s": round(images / batched_s, 3),
            "separate_images_per_s": round(images / separate_s, 3),
            "batched_speedup": round(separate_s / batched_s, 2), **memory.figures()}


def section_score(plan: Plan, state: dict[str, Any]) -> dict[str, Any]:
    """PickScore and the aesthetic predictor on the sd section's images (noise of the same size when it did not
    run), then on the scorer pool's batch of them."""
    from PIL import Image

    from bp_ray.models.loading import load_aesthetic, load_pickscore

    cfg = plan.config()
    pixels = state.get("pixels")
    if pixels is None:
        size = cfg.data.render.height
        pixels = np.random.default_rng(0).integers(0, 256, (plan.seeds, size, size, 3), dtype=np.uint8)
    images = [Image.fromarray(p) for p in pixels]
    batch = cfg.data.scorer_pool.batch_size
    big = (images * math.ceil(batch / len(images)))[:batch]
    out: dict[str, Any] = {"pickscore_model": cfg.models.pickscore, "aesthetic_model": cfg.models.aesthetic,
                           "images": len(images), "pool_batch": batch}
    with DeviceMemory(plan.gpu) as memory:
        (pickscore, aesthetic), load_s = timed(lambda: (load_pickscore(cfg.models, plan.device),
                                                        load_aesthetic(cfg.models, plan.device)), plan.device)
        out["load_s"] = round(load_s, 1)
        scorers: dict[str, Callable[[list[Any]], Any]] = {
            "pickscore": lambda imgs: pickscore.score(imgs, [PROMPT] * len(imgs)),
            "aesthetic": lambda imgs: aesthetic.score(imgs)}
        for name, score in scorers.items():
            score(images)  # warm-up
            _, seconds = timed(lambda score=score: score(images), plan.device)
            _, pool_seconds = timed(lambda score=score: score(big), plan.device)
            out |= {f"{name}_images_per_s": round(len(images) / seconds, 2),
                    f"{name}_pool_images_per_s": round(batch / pool_seconds, 2)}
    return {**out, **memory.figures()}


def section_sft(plan: Plan) -> dict[str, Any]:
    """`run_sft` on one worker for a few steps at the preset's batch size and max_length."""
    from bp_ray.data.subject_pairs import write_pairs
    from bp_ray.models.loading import resolve_model
    from bp_ray.train.sft import run_sft

    gpu = str(plan.gpu).lower()
    sets = [f"sft.stop_after_step={plan.sft_steps}", "sft.resources.num_workers=1", f"sft.resources.use_gpu={gpu}"]
    cfg = plan.config(*sets)
    sft = cfg.sft
    # Targets of ~max_length words: every example is cut at max_length tokens, the paper's longest sequences.
    pairs = synthetic_pairs(max(sft.batch_size * plan.sft_steps, 64) + 16, high_words=sft.max_length)
    pairs_dir = write_pairs(pairs, plan.work / "sft-data")
    params = count_parameters(Path(resolve_model(cfg.models.policy, cfg.models)))
    storage, note = checkpoint_room(params, plan.work)
    if storage is None:
        note, storage = f"{note}: trying anyway", ""
    if storage:
        cfg = plan.config(*sets, f"cluster.storage_path={storage}")
    out = plan.work / "sft"
    say(f"  {billions(params)} parameters, batch {sft.batch_size} x max_length {sft.max_length}, ZeRO-"
        f"{sft.deepspeed.zero_stage} {sft.deepspeed.precision}, {plan.sft_steps} steps{'; ' + note if note else ''}")
    try:
        with DeviceMemory(plan.gpu) as memory:
            manifest, wall = timed(lambda: run_sft(cfg.sft, cfg.models, cfg.cluster, pairs_dir, out), "cpu")
        steady, steps = steady_metrics(out / "metrics", ["perf/tokens_per_s", "time/step_s"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if storage:
            shutil.rmtree(storage, ignore_errors=True)
    tokens_per_s, step_s = steady["perf/tokens_per_s"], steady["time/step_s"]
    return {"model": cfg.models.policy, "parameters": params, "batch_size": sft.batch_size,
            "max_length": sft.max_length, "zero_stage": sft.deepspeed.zero_stage,
            "precision": sft.deepspeed.precision, "steps": steps,
            "tokens_per_s": round(tokens_per_s, 1), "step_s": round(step_s, 3),
            "tokens_per_step": round(tokens_per_s * step_s), "model_tflops": round(6 * params * tokens_per_s / 1e12, 1),
            "wall_s": round(wall, 1), "stage_wall_s": manifest.get("wall_time_s"), "note": note,
            **memory.figures()}


def section_ppo(plan: Plan) -> dict[str, Any]:
    """`run_ppo` at the preset's PPO settings for a few iterations on one worker, the reference and reward actors
    beside it on the same GPU; the SFT policy is the zoo's BLOOM and the reward models untrained heads on it."""
    from bp_ray.data.subject_pairs import write_pairs
    from bp_ray.models.loading import resolve_model
    from bp_ray.rewards.labeler import RewardSetup
    from bp_ray.train.ppo import run_ppo
    from bp_ray.train.ppo_actors import actor_groups

    gpu = str(plan.gpu).lower()
    sets = [f"ppo.total_steps={plan.ppo_iterations}", "ppo.eval_prompts=1", "ppo.resources.num_workers=1",
            f"ppo.resources.use_gpu={gpu}", f"ppo.value_model={plan.critic}"]
    if plan.gpu:
        sets.append(f"ppo.actor_gpus={plan.actor_gpus}")
    if plan.smoke:
        sets += ["ppo.rollout_batch_size=8", "ppo.minibatch_size=4", "ppo.max_new_tokens=16", "ppo.ppo_epochs=2"]
    cfg = plan.config(*sets)
    policy = Path(resolve_model(cfg.models.policy, cfg.models))
    params = count_parameters(policy)
    trained = 2 if cfg.ppo.value_model == "separate" else 1
    storage, note = checkpoint_room(trained * params, plan.work)
    if storage is None and trained == 2:  # a shared critic (a value head on the policy) halves the checkpoint
        why = note
        sets.append("ppo.value_model=shared")
        trained = 1
        storage, note = checkpoint_room(params, plan.work)
        note = f"value_model=shared, not the paper's separate critic: {why}" + (f"; {note}" if note else "")
    if storage is None:
        note, storage = f"{note}: trying anyway", ""
    if storage:
        sets.append(f"cluster.storage_path={storage}")
    cfg = plan.config(*sets)
    ppo = cfg.ppo
    preset_steps = plan.config().ppo.total_steps  # the preset's run length, for the projection

    # One iteration's prompts and some to spare, with held-out pairs (sft.eval_fraction) for the greedy evaluation.
    pairs = synthetic_pairs(max(int(ppo.rollout_batch_size * 1.25) + 16, 64), high_words=40)
    pairs_dir = write_pairs(pairs, plan.work / "ppo-data")
    sft_dir = plan.work / "ppo-sft"
    shutil.rmtree(sft_dir, ignore_errors=True)
    sft_dir.mkdir(parents=True)
    (sft_dir / "model").symlink_to(policy.resolve())  # the "SFT policy": the zoo's BLOOM
    rm_dir = untrained_reward_models(cfg, plan.work / "ppo-rm")
    actors = 2 * actor_groups(ppo.resources.num_workers, ppo.workers_per_actor)
    worker_gpus = None
    if plan.gpu and ppo.actor_gpus > 0:
        import torch

        if torch.cuda.device_count() < ppo.resources.num_workers + actors * ppo.actor_gpus:
            # the actors share the worker's GPU: the worker holds what they leave
            worker_gpus = round(1 - actors * ppo.actor_gpus, 4)
            ppo.resources.gpus_per_worker = worker_gpus
    out = plan.work / "ppo"
    say(f"  {trained} x {billions(params)} trained ({ppo.value_model} critic), rollout {ppo.rollout_batch_size}, "
        f"minibatch {ppo.minibatch_size}, {ppo.max_new_tokens} new tokens, {ppo.ppo_epochs} epochs, "
        f"{plan.ppo_iterations} iterations, reward {ppo.reward_source}, actor_gpus {ppo.actor_gpus}"
        + (f", worker {worker_gpus} GPU" if worker_gpus else "") + (f"; {note}" if note else ""))
    try:
        with DeviceMemory(plan.gpu) as memory:
            manifest, wall = timed(lambda: run_ppo(
                ppo, cfg.sft, cfg.cluster, RewardSetup.for_labels(cfg.data, cfg.rewards, cfg.models),
                cfg.data.scorer_pool, pairs_dir, sft_dir, rm_dir, out), "cpu")
        columns = ["perf/samples_per_s", "time/generate_s", "time/reward_s", "time/rollout_wait_s", "time/update_s",
                   "response_tokens"]
        steady, iterations = steady_metrics(out / "metrics", columns)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if storage:
            shutil.rmtree(storage, ignore_errors=True)
    return {"model": cfg.models.policy, "parameters": params, "trained_models": trained, "value_model": ppo.value_model,
            "rollout_batch_size": ppo.rollout_batch_size, "minibatch_size": ppo.minibatch_size,
            "max_new_tokens": ppo.max_new_tokens, "ppo_epochs": ppo.ppo_epochs, "actor_gpus": ppo.actor_gpus,
            "worker_gpus": worker_gpus, "iterations": iterations, "total_steps_preset": preset_steps,
            "samples_per_s": round(steady["perf/samples_per_s"], 3),
            "iteration_s": round(ppo.rollout_batch_size / steady["perf/samples_per_s"], 2),
            **{f"{key.split('/')[1]}": round(steady[key], 2) for key in columns[1:-1]},
            "response_tokens": round(steady.get("response_tokens", float("nan")), 1),
            "wall_s": round(wall, 1), "stage_wall_s": manifest.get("wall_time_s"), "note": note,
            **memory.figures()}


# --- summary ------------------------------------------------------------------------------------------------------

def summary_rows(sections: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(what, measured on this device, the paper's 4-GPU setup: projection) rows of the summary table."""
    rows: list[tuple[str, str, str]] = []

    def add(label: str, value: float | None, unit: str, parallel: bool, digits: int = 2) -> None:
        if value is None or not math.isfinite(value):
            return
        projected = f"{PAPER_GPUS * value:,.{digits}f} {unit}" if parallel else "-"
        rows.append((label, f"{value:,.{digits}f} {unit}", projected))

    sd, score, sft, ppo = (sections.get(name, {}) for name in SECTIONS)
    if "batched_images_per_s" in sd:
        render = (f"{model_name(sd['model'])} {sd['image_size']}², {sd['steps']} steps, {sd['scheduler']}, "
                  f"{sd['dtype']}")
        rows.append((render, "", ""))
        add(f"  {sd['seeds']} seeds in one batched call", sd["batched_images_per_s"], "images/s", True)
        add(f"  {sd['seeds']} single-seed calls", sd["separate_images_per_s"], "images/s", True)
        add("  batched / single-seed", sd["batched_speedup"], "x", False)
    for name in ("pickscore", "aesthetic"):
        if f"{name}_images_per_s" in score:
            label = model_name(score[f"{name}_model"])
            add(f"{label}, {score['images']} images", score[f"{name}_images_per_s"], "images/s", True, 1)
            add(f"{label}, batch {score['pool_batch']}", score[f"{name}_pool_images_per_s"], "images/s", True, 1)
    if "batched_images_per_s" in sd and "pickscore_pool_images_per_s" in score:
        per_image = (1 / sd["batched_images_per_s"] + 1 / score["pickscore_pool_images_per_s"]
                     + 1 / score["aesthetic_pool_images_per_s"])
        add(f"labelling (derived): prompts/s at {sd['seeds']} seeds", 1 / (per_image * sd["seeds"]), "prompts/s",
            True, 3)
    if "tokens_per_s" in sft:
        rows.append((f"SFT {model_name(sft['model'])} {billions(sft['parameters'])}, batch {sft['batch_size']} x "
                     f"{sft['max_length']} tokens, ZeRO-{sft['zero_stage']} {sft['precision']}", "", ""))
        add("  tokens/s", sft["tokens_per_s"], "tokens/s", True, 0)
        add("  s/step", sft["step_s"], "s", False, 3)
        add("  model FLOP/s (6 N tokens/s)", sft["model_tflops"], "TFLOP/s", True, 1)
    if "samples_per_s" in ppo:
        rows.append((f"PPO {model_name(ppo['model'])}, rollout {ppo['rollout_batch_size']}, minibatch "
                     f"{ppo['minibatch_size']}, {ppo['max_new_tokens']} new tokens, {ppo['ppo_epochs']} epochs, "
                     f"{ppo['value_model']} critic", "", ""))
        add("  samples/s", ppo["samples_per_s"], "samples/s", True, 2)
        add("  s per iteration", ppo["iteration_s"], "s", False, 1)
        for phase in ("generate_s", "reward_s", "update_s"):
            add(f"    {phase[:-2]}", ppo.get(phase), "s", False, 1)
        hours = ppo["total_steps_preset"] * ppo["rollout_batch_size"] / ppo["samples_per_s"] / 3600
        rows.append((f"  the preset's {ppo['total_steps_preset']} iterations (derived)", f"{hours:,.1f} h",
                     f"{hours / PAPER_GPUS:,.1f} h"))
    for name in ("sd", "score", "sft", "ppo"):
        if "gpu_device_peak_gib" in sections.get(name, {}):
            got = sections[name]
            rows.append((f"peak GPU memory, {name}", f"{got['gpu_device_peak_gib']:.1f} GiB device", "-"))
    return rows


def format_summary(rows: list[tuple[str, str, str]], device: str, notes: dict[str, str]) -> str:
    heads = (f"this {device}, measured", f"paper: {PAPER_GPUS} GPUs, projected")
    width = max([len(r[0]) for r in rows] + [10])
    lines = [f"{'':<{width}}  {heads[0]:>20}  {heads[1]:>24}", "-" * (width + 48)]
    lines += [f"{label:<{width}}  {got:>20}  {projected:>24}" for label, got, projected in rows]
    lines.append(f"Projection = {PAPER_GPUS} x the one-device figure for the data-parallel rows (communication "
                 "ignored); the paper reports no throughput to compare with.")
    lines += [f"note, {name}: {note}" for name, note in notes.items()]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------------------

def parse_plan(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="fewer SFT steps (4) and PPO iterations (2)")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny preset on the CPU with tiny counts: tests the script in ~2 min on 2 cores")
    parser.add_argument("--preset", default=None, help="default paper-shapes (--smoke: tiny)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda (--smoke: cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, applied last")
    parser.add_argument("--seeds", type=int, default=None, help="images per prompt in sd (paper: 8; --smoke: 4)")
    parser.add_argument("--sft-steps", type=int, default=None, help="default 6 (--quick 4, --smoke 3)")
    parser.add_argument("--ppo-iterations", type=int, default=None, help="default 3 (--quick and --smoke 2)")
    parser.add_argument("--actor-gpus", type=float, default=0.2,
                        help="GPU share of PPO's reference and of its reward actor")
    parser.add_argument("--critic", choices=("separate", "shared"), default="separate",
                        help="PPO value model (paper preset: separate); separate falls back to shared when its "
                             "checkpoint cannot fit on the disk")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bp-ray-gpu-paper")
    parser.add_argument("--cache", type=Path, default=None,
                        help="BP_RAY_CACHE (the zoo); default <work-dir>/cache, --smoke: the existing one")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    sections = [s for s in SECTIONS if s in sections]

    smoke = args.smoke
    if args.cache or not smoke:
        os.environ["BP_RAY_CACHE"] = str((args.cache or args.work_dir / "cache").resolve())
    sft_steps = args.sft_steps or (3 if smoke else 4 if args.quick else 6)
    ppo_iterations = args.ppo_iterations or (2 if smoke or args.quick else 3)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    plan = Plan(preset=args.preset or ("tiny" if smoke else "paper-shapes"),
                device=args.device or ("cpu" if smoke else "cuda"), base=list(args.overrides), sections=sections,
                seeds=args.seeds or (4 if smoke else 8), sft_steps=sft_steps, ppo_iterations=ppo_iterations,
                actor_gpus=args.actor_gpus, critic=args.critic, smoke=smoke, work=args.work_dir.resolve(),
                json=args.json)
    return plan


def main(argv: list[str] | None = None) -> int:
    plan = parse_plan(argv)
    import torch

    from bp_ray.console import PROGRESS_ENV

    # Training workers report their steps to progress files (as under `bp-ray pipeline`) rather than tqdm_ray bars,
    # whose redraws would fill the log that the device tool returns; the per-step figures come from metrics.csv.
    os.environ.setdefault(PROGRESS_ENV, str(plan.work / "progress"))

    if plan.gpu and not torch.cuda.is_available():
        say("error: --device cuda but torch sees no GPU (use --smoke for the CPU run)")
        return 2
    report = Report(environment(plan))
    if os.environ.get("OUT"):
        report.destinations.append(Path(os.environ["OUT"]) / "gpu_paper.json")
    if plan.json:
        report.destinations.append(plan.json)
    gpu = report.meta.get("gpu", {})
    say(f"gpu_paper: preset {plan.preset}, device {plan.device}"
        + (f" ({gpu['name']}, {gpu['memory_gib']} GiB)" if gpu else "") + f", sections {', '.join(plan.sections)}, "
        f"work {plan.work}, BP_RAY_CACHE {os.environ.get('BP_RAY_CACHE', '(default)')}")
    say("versions: " + ", ".join(f"{k} {v}" for k, v in report.meta["versions"].items()))

    state: dict[str, Any] = {}
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "build": lambda: section_build(plan), "sd": lambda: section_sd(plan, state),
        "score": lambda: section_score(plan, state), "sft": lambda: section_sft(plan),
        "ppo": lambda: section_ppo(plan)}
    started = time.perf_counter()
    for name in ("build", *plan.sections):
        say(f"[{name}] starting (expected ~{EXPECTED_S[name]} s on an H200) at {time.perf_counter() - started:.0f} s")
        begin = time.perf_counter()
        try:
            figures = runners[name]()
            figures["section_s"] = round(time.perf_counter() - begin, 1)
            say(f"[{name}] done in {figures['section_s']} s: " + json.dumps(
                {k: v for k, v in figures.items() if not isinstance(v, dict)}, default=str))
        except Exception as error:  # a failed section is reported; the others still run
            traceback.print_exc()
            line = error_line(error)
            figures = {"error": line, "section_s": round(time.perf_counter() - begin, 1)}
            say(f"[{name}] FAILED after {figures['section_s']} s: {line}")
        free_device_memory(plan.device)  # the section's models are gone with its frame: give their memory back
        report.sections[name] = figures
        report.write()

    ray = sys.modules.get("ray")  # imported only by the sft and ppo sections: sd and score run without Ray
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    rows = summary_rows(report.sections)
    failed = [name for name, got in report.sections.items() if "error" in got]
    notes = {name: got.get("error") or got.get("note") for name, got in report.sections.items()}
    table = format_summary(rows, "GPU" if plan.gpu else "CPU", {name: note for name, note in notes.items() if note})
    failures = f"; FAILED: {', '.join(failed)}" if failed else ""
    say(f"\nsummary ({time.perf_counter() - started:.0f} s in all{failures})")
    say(table)
    report.meta["total_s"] = round(time.perf_counter() - started, 1)
    report.write({"rows": [list(row) for row in rows], "paper_gpus": PAPER_GPUS,
                  "projection": f"{PAPER_GPUS} x the one-device figure (data-parallel stages), not a measurement"})
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_paper.txt").write_text(table + "\n")
    for path in report.destinations:
        say(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
