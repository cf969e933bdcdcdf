"""`bp-ray pipeline --dry-run`: every stage once with the smallest counts, then one Serve request, measured.

Before a long job on a cluster, the dry run shows that each stage starts, loads its models, takes a step and writes
its output at the config's real model sizes, dtypes and token limits, in minutes. Per stage it prints the parameters
of the models it holds, the peak resident memory of the driver and every Ray process under it (sampled), its time,
and the per-GPU memory the config's batch sizes and precision would need (bp_ray/memory_estimate.py states the
formula). The counts it shrinks: corpus rows, generated tokens, training steps, rollout and batch sizes, evaluation
prompts, diffusion steps (1); it keeps the number of seeds, the image size, the sequence limits and the models.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bp_ray import memory_estimate as M
from bp_ray.config import PipelineConfig
from bp_ray.config_loader import set_value
from bp_ray.layout import RunLayout
from bp_ray.stages import STAGE_NAMES

REPORT = "dry_run.json"
SERVE_STAGE = "serve"
STAGE_ROLES = {
    "corpus": (), "data": ("captioner", "rewriter", "aesthetic"), "rewards": ("diffusion", "pickscore", "aesthetic"),
    "sft": ("policy",), "rm": ("rm_backbone", "rm_backbone"), "ppo": ("policy", "policy", "policy", "rm_backbone",
                                                                      "rm_backbone"),
    "eval": ("diffusion", "pickscore", "aesthetic", "clip_relevance", "policy"), SERVE_STAGE: ("policy",),
}
"""Models each stage holds at once (PPO: policy, critic, reference and the two reward models)."""


def dry_run_overrides(cfg: PipelineConfig, gpus: int, shared_critic: bool = False) -> list[str]:
    """`key=value` settings that shrink every count of `cfg` to one step of each stage; with no GPU, CPU
    placement and one worker per stage; `shared_critic` puts PPO's critic on the policy (where a separate one
    does not fit in this machine's memory)."""
    # On a cluster every trainer keeps its workers, so each batch holds one example per worker.
    workers = max(cfg.sft.resources.num_workers, cfg.rm.resources.num_workers, cfg.ppo.resources.num_workers) \
        if gpus else 1
    group = cfg.ppo.group_size if cfg.ppo.algorithm != "ppo" else 1
    sets = {
        "data.corpus_rows": 16 * workers, "data.limit": 16 * workers, "data.max_new_tokens": 16,
        "data.caption_max_new_tokens": 12,
        "data.aesthetic_threshold": "null",  # random or untrained scorers would drop every pair
        "data.llm_fraction": 0.25,
        "sft.epochs": 1, "sft.stop_after_step": 1, "sft.batch_size": workers, "sft.eval_fraction": 0.5,
        "rm.epochs": 1, "rm.stop_after_step": 1, "rm.batch_size": workers, "rm.eval_fraction": 0,
        "rewards.max_prompts": workers,  # one prompt's num_seeds renders (per worker): labelling at full size
        "ppo.total_steps": 1, "ppo.ppo_epochs": 1, "ppo.max_new_tokens": 8, "ppo.eval_prompts": workers,
        "ppo.rollout_batch_size": group * workers, "ppo.minibatch_size": group * workers,
        "data.render.num_inference_steps": 1, "eval.render.num_inference_steps": 1,
        "eval.num_prompts": 1, "eval.num_seeds": 1, "eval.max_new_tokens": 8, "eval.systems": '["original","ppo"]',
        "eval.grid_prompts": 1, "serve.min_replicas": 1, "serve.max_replicas": 1, "serve.ingress_replicas": 1,
        "serve.enable_render": "false", "serve.port": _free_port(),
    }
    if shared_critic:
        sets["ppo.value_model"] = "shared"
    if gpus == 0:
        sets.update({"models.device": "cpu", "cluster.num_cpus": 8, "ppo.actor_gpus": 0, "ppo.actor_cpus": 0.5,
                     "serve.num_gpus_per_replica": 0, "serve.render_gpus": 0, "serve.num_cpus_per_replica": 1,
                     "serve.ingress_cpus": 0.5})
        for stage in ("sft", "rm", "ppo"):
            sets.update({f"{stage}.resources.num_workers": 1, f"{stage}.resources.use_gpu": "false",
                         f"{stage}.resources.cpus_per_worker": 1})
        for pool in ("model_pool", "captioner_pool", "rewriter_pool", "aesthetic_pool", "renderer_pool",
                     "scorer_pool"):
            sets.update({f"data.{pool}.num_gpus": 0, f"data.{pool}.num_cpus": 1, f"data.{pool}.min_actors": 1,
                         f"data.{pool}.max_actors": 1})
    return [f"{key}={value}" for key, value in sets.items()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shrink(cfg: PipelineConfig, gpus: int, shared_critic: bool = False) -> PipelineConfig:
    """A copy of `cfg` with dry_run_overrides applied."""
    small = copy.deepcopy(cfg)
    for item in dry_run_overrides(cfg, gpus, shared_critic):
        key, _, value = item.partition("=")
        set_value(small, key, yaml.safe_load(value))
    return small


class PeakMemory:
    """Samples the resident memory of this process and all its descendants (a local Ray's workers, raylet and
    GCS) every `interval` seconds; `.peak` is the largest sum seen, `.largest` the largest single process."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def process_rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        sizes = []
        for proc in [me, *me.children(recursive=True)]:
            try:
                sizes.append(proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak = max(self.peak, sum(sizes))
        self.largest = max(self.largest, max(sizes, default=0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def count_parameters(folder: Path) -> int:
    """Parameters in a model folder's safetensors files (read from their headers, nothing loaded)."""
    import math

    from safetensors import safe_open

    total = 0
    for path in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:  # not iterable: list its keys
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in list(handle.keys()))
    return total


def lm_shape(folder: Path, real: bool = True) -> M.LMShape:
    """Dimensions of a causal LM folder. A zoo that built it with fewer layers than the real model records the real
    count (`full_layers` in its zoo.json): `real` gives the real model's shape, else the folder's."""
    config = json.loads((Path(folder) / "config.json").read_text())
    layers = int(config.get("n_layer") or config.get("num_hidden_layers"))
    hidden = int(config.get("hidden_size") or config.get("n_embed"))
    params = count_parameters(folder)
    zoo = Path(folder) / "zoo.json"
    full = json.loads(zoo.read_text()).get("full_layers", layers) if zoo.exists() and real else layers
    per_layer = 12 * hidden * hidden + 13 * hidden  # attention (4h² + 4h) and MLP (8h² + 5h), two layer norms
    return M.LMShape(params + (full - layers) * per_layer, full, hidden, int(config["vocab_size"]))


def ppo_fits_here(cfg: PipelineConfig, shape: M.LMShape, memory: int) -> bool:
    """Whether PPO as configured (policy and critic trained on one worker, a float32 reference and two float32
    reward models beside them) fits in 80% of `memory` bytes on this machine."""
    trained = 2 if cfg.ppo.algorithm == "ppo" and cfg.ppo.value_model == "separate" else 1
    need = trained * M.model_state_bytes(shape.params, cfg.ppo.deepspeed.precision, cfg.ppo.deepspeed.zero_stage,
                                         1) + 3 * shape.params * 4
    return need <= 0.8 * memory


@dataclass
class StageMeasure:
    stage: str
    seconds: float
    peak_bytes: int
    largest_bytes: int
    step_seconds: float | None = None
    checkpoint_bytes: int = 0
    parameters: int = 0
    gpu_estimate_bytes: float | None = None
    formula: str = ""
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def _step_seconds(folder: Path) -> float | None:
    """The stage's slowest last logged step (`time/step_s`; PPO: its rollout and update) from its metrics files
    (the RM stage has one per reward model)."""
    import pandas as pd

    steps = []
    for path in sorted(folder.rglob("metrics/*.csv")):
        last = pd.read_csv(path).iloc[-1]
        if "time/step_s" in last:
            steps.append(float(last["time/step_s"]))
        elif "time/update_s" in last:
            steps.append(float(last["time/rollout_wait_s"] + last["time/update_s"]))
    return max(steps) if steps else None


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def measured_runners(runners: dict[str, Callable[[bool], dict[str, Any]]], measures: list[StageMeasure],
                     layout: RunLayout) -> dict[str, Callable[[bool], dict[str, Any]]]:
    """Each stage's run wrapped in a PeakMemory and a clock; its Ray Train checkpoints measured, then removed."""
    def wrap(stage: str, run: Callable[[bool], dict[str, Any]]) -> Callable[[bool], dict[str, Any]]:
        def measured(resume: bool) -> dict[str, Any]:
            started = time.perf_counter()
            with PeakMemory() as memory:
                manifest = run(resume)
            measure = StageMeasure(stage, time.perf_counter() - started, memory.peak, memory.largest)
            # A trainer's checkpoint holds its optimizer states: 12 GB for PPO's policy and critic at the real
            # vocabulary. Nothing resumes a dry run, so only its size is kept.
            folder = layout.stage_dir(stage)  # Ray Train storage: <stage>/ray, the RMs' <stage>/<model>/ray
            for checkpoints in [*folder.glob("ray"), *folder.glob("*/ray")]:
                measure.checkpoint_bytes += folder_bytes(checkpoints)
                shutil.rmtree(checkpoints, ignore_errors=True)
            measures.append(measure)
            return manifest
        return measured

    return {stage: wrap(stage, run) for stage, run in runners.items()}


def serve_once(cfg: PipelineConfig, model_dir: Path, prompt: str = "a cat on a sofa") -> tuple[StageMeasure, str]:
    """Start the endpoint on the trained model, send one /v1/beautify request, stop it: (measure, the answer)."""
    from bp_ray.serve.runner import start_serve, stop_serve

    started = time.perf_counter()
    with PeakMemory() as memory:
        url = start_serve(cfg, str(model_dir))
        try:
            request = urllib.request.Request(f"{url}/v1/beautify", data=json.dumps({"prompt": prompt}).encode(),
                                             headers={"Content-Type": "application/json"})
            sent = time.perf_counter()
            with urllib.request.urlopen(request, timeout=600) as response:
                answer = json.loads(response.read())
            step = time.perf_counter() - sent
        finally:
            stop_serve()
    measure = StageMeasure(SERVE_STAGE, time.perf_counter() - started, memory.peak, memory.largest, step)
    outputs = answer.get("outputs") or [{}]
    return measure, str(outputs[0].get("text", answer))


# --- per-GPU memory at the full config -------------------------------------------------------------------------

def gpu_estimates(cfg: PipelineConfig, folders: dict[str, Path], measures: dict[str, StageMeasure],
                  baseline: int = 0) -> dict[str, tuple[float, str]]:
    """Stage -> (bytes per GPU at `cfg`'s batch sizes and precision, the formula with its numbers)."""
    from bp_ray.models.loading import resolve_model
    from bp_ray.train.token_logprobs import chunk_positions

    def folder(role: str) -> Path:
        return folders.get(role) or Path(resolve_model(getattr(cfg.models, role), cfg.models))

    lm = lm_shape(folder("policy"))
    rm_lm = lm_shape(folder("rm_backbone"))
    out: dict[str, tuple[float, str]] = {}

    def training(stage: str, shape: M.LMShape, models: int, micro: int, seq: int, lm_head: bool,
                 extra: float = 0.0, extra_text: str = "") -> None:
        section = getattr(cfg, stage)
        chunk = chunk_positions(micro, shape.vocab) if lm_head else 0
        ds, workers = section.deepspeed, section.resources.num_workers
        total = M.training_bytes(shape, models, ds.precision, ds.zero_stage, workers, micro, seq, chunk) + extra
        states = M.model_state_bytes(shape.params, ds.precision, ds.zero_stage, workers)
        checkpoint = models * M.checkpoint_bytes(shape.params, ds.precision)
        out[stage] = (total, f"{models}×states(Ψ={shape.params / 1e9:.2f}B, {ds.precision}, ZeRO-{ds.zero_stage}, "
                             f"N={workers})={models * states / M.GIB:.1f} GiB + act(b={micro}, s={seq}, "
                             f"L={shape.layers}) + logits chunk(c={chunk}, V={shape.vocab:,}){extra_text}; "
                             f"a checkpoint {checkpoint / M.GIB:.0f} GiB")

    training("sft", lm, 1, max(cfg.sft.batch_size // cfg.sft.resources.num_workers, 1), cfg.sft.max_length,
             True)
    training("rm", rm_lm, 1, max(cfg.rm.batch_size // cfg.rm.resources.num_workers, 1), cfg.rm.max_length, False)
    ppo, workers = cfg.ppo, cfg.ppo.resources.num_workers
    seq = ppo.max_query_tokens + ppo.max_new_tokens
    kv = M.kv_cache_bytes(lm, max(ppo.rollout_batch_size // workers, 1), seq, ppo.deepspeed.precision)
    training("ppo", lm, 2 if ppo.algorithm == "ppo" and ppo.value_model == "separate" else 1,
             max(ppo.minibatch_size // workers, 1), seq, True, kv,
             f" + KV cache(b={ppo.rollout_batch_size // workers}, s={seq})={kv / M.GIB:.1f} GiB; reference actor "
             f"{M.inference_bytes(lm.params, cfg.models.dtype) / M.GIB:.1f} GiB, reward actor "
             f"{2 * M.inference_bytes(rm_lm.params, cfg.models.dtype) / M.GIB:.1f} GiB on their own GPUs")

    def inference(stage: str, roles: tuple[str, ...], dtype: str) -> None:
        params = sum(count_parameters(folder(role)) for role in dict.fromkeys(roles))
        measure = measures.get(stage)
        weights = M.inference_bytes(params, dtype)
        activations = M.scaled_activations(measure.largest_bytes - baseline, params * 4, 1, 1, "float32", dtype) \
            if measure else 0.0
        out[stage] = (weights + activations, f"weights {params / 1e9:.2f}B×{M.bytes_per_value(dtype)} B="
                                             f"{weights / M.GIB:.1f} GiB + measured activations at {dtype}")

    dtype = cfg.models.dtype
    inference("rewards", ("diffusion",), dtype)
    inference("data", ("captioner",), "float32")  # BLIP loads in float32 (see loading.load_captioner)
    inference("eval", ("diffusion", "pickscore", "aesthetic", "clip_relevance"), dtype)  # one reward service
    serve_kv = M.kv_cache_bytes(lm, cfg.serve.max_batch_size, seq, dtype)
    out[SERVE_STAGE] = (M.inference_bytes(lm.params, dtype) + serve_kv,
                        f"weights {lm.params / 1e9:.2f}B×{M.bytes_per_value(dtype)} B + KV cache(b="
                        f"{cfg.serve.max_batch_size}, s={seq})={serve_kv / M.GIB:.1f} GiB")
    return out


def format_table(measures: list[StageMeasure]) -> str:
    header = f"{'stage':<8} {'params (run)':>13} {'peak RSS':>9} {'largest':>8} {'stage s':>8} {'step s':>7} " \
             f"{'ckpt':>8} {'GPU est.':>9}  formula / note"
    lines = [header, "-" * len(header)]
    for m in measures:
        step = f"{m.step_seconds:7.1f}" if m.step_seconds is not None else f"{'-':>7}"
        ckpt = f"{m.checkpoint_bytes / M.GIB:4.1f} GiB" if m.checkpoint_bytes else f"{'-':>8}"
        gpu = f"{m.gpu_estimate_bytes / M.GIB:5.1f} GiB" if m.gpu_estimate_bytes is not None else f"{'-':>9}"
        text = "; ".join(x for x in (m.formula, m.note) if x)
        lines.append(f"{m.stage:<8} {m.parameters / 1e9:11.3f} B {m.peak_bytes / M.GIB:5.1f} GiB "
                     f"{m.largest_bytes / M.GIB:4.1f} GiB {m.seconds:8.1f} {step} {ckpt} {gpu}  {text}")
    return "\n".join(lines)


def cluster_gpus(cfg: PipelineConfig) -> int:
    """GPUs of the Ray cluster the config joins, or of this machine for a local Ray (not started yet: the dry
    run's own settings size it)."""
    import os

    import torch

    if not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        return torch.cuda.device_count()
    import ray

    from bp_ray.ray_runtime import init_ray

    init_ray(cfg.cluster)
    return int(ray.cluster_resources().get("GPU", 0))


def run_dry_run(cfg: PipelineConfig, layout: RunLayout, gpus: int,
                on_stage: Callable[[str], None] | None = None,
                on_done: Callable[[Any], None] | None = None) -> list[StageMeasure]:
    """Every stage of `cfg` once at the smallest counts (`shrink`), then one Serve request; the measures, with
    per-GPU estimates for `cfg` itself; written to <run>/dry_run.json."""
    import psutil

    from bp_ray.models.loading import resolve_model
    from bp_ray.pipeline import run_pipeline, stage_runners

    policy = Path(resolve_model(cfg.models.policy, cfg.models))
    shared_critic = gpus == 0 and not ppo_fits_here(cfg, lm_shape(policy, real=False), psutil.virtual_memory().total)
    small = shrink(cfg, gpus, shared_critic)
    baseline = PeakMemory.process_rss()  # a Python process with torch loaded: what no model costs
    for stage in STAGE_NAMES:  # a dry run starts over (in its own folder, never a real run's)
        shutil.rmtree(layout.stage_dir(stage), ignore_errors=True)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.config_file.write_text(small.to_yaml())
    measures: list[StageMeasure] = []
    run_pipeline(small, measured_runners(stage_runners(small, layout), measures, layout), layout, on_stage,
                 on_done)
    if on_stage:
        on_stage(SERVE_STAGE)
    serve, answer = serve_once(small, layout.model_dir("ppo"))
    measures.append(serve)
    if on_done:
        on_done(serve)
    by_stage = {m.stage: m for m in measures}
    estimates = gpu_estimates(cfg, {}, by_stage, baseline)
    for m in measures:
        roles = dict.fromkeys(STAGE_ROLES.get(m.stage, ()))
        m.parameters = sum(count_parameters(Path(resolve_model(getattr(small.models, role), small.models)))
                           * STAGE_ROLES[m.stage].count(role) for role in roles)
        if m.step_seconds is None and m.stage in ("sft", "rm", "ppo"):
            m.step_seconds = _step_seconds(layout.stage_dir(m.stage))
        if m.stage in estimates:
            m.gpu_estimate_bytes, m.formula = estimates[m.stage]
    by_stage[SERVE_STAGE].detail["answer"] = answer
    if shared_critic:
        by_stage["ppo"].note = "ran with value_model=shared: a separate critic does not fit this machine's memory"
    run_shape, real_shape = lm_shape(policy, real=False), lm_shape(policy)
    if run_shape.layers != real_shape.layers:
        for stage in ("data", "sft", "rm", "ppo", "eval", SERVE_STAGE):
            if stage in by_stage:
                by_stage[stage].note = "; ".join(x for x in (
                    f"LM at {run_shape.layers} of {real_shape.layers} layers (real width and vocabulary)",
                    by_stage[stage].note) if x)
    (layout.root / REPORT).write_text(json.dumps([asdict(m) for m in measures], indent=2))
    return measures
