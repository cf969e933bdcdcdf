"""The model deployments behind the ingress: the policy (Generator) and Stable Diffusion (Renderer). Each is a
process of its own, so a model never competes with HTTP handling for one interpreter lock."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray
from ray import serve

from bp_ray.config import PipelineConfig
from bp_ray.serve import schemas as S
from bp_ray.serve.generation import GenerationRequest, GenerationResult, generate, rows_in, stream_batch

logger = logging.getLogger(__name__)


@serve.deployment
class Renderer:
    """Stable Diffusion behind /v1/render: one prompt and seed -> PNG bytes."""

    def __init__(self, cfg: PipelineConfig):
        from bp_ray.models.loading import load_diffusion

        self.cfg = cfg
        models = cfg.models
        self.pipe = load_diffusion(models.diffusion, models, device=models.device, dtype=models.dtype,
                                   scheduler=self.cfg.serve.render.scheduler)
        # Serve runs sync methods on a thread pool, and a diffusers pipeline is not thread-safe: its scheduler
        # keeps the step index and sigmas of the call in progress.
        self.lock = threading.Lock()

    def render(self, prompt: str, seed: int, negative_prompt: str | None = None) -> bytes:
        """negative_prompt goes to diffusers unchanged; None is its default (the empty negative)."""
        from PIL import Image

        from bp_ray.rewards.render import render_seeds

        with self.lock:
            pixels = render_seeds(self.pipe, [prompt], [seed], self.cfg.serve.render,
                                  negative_prompt=negative_prompt)[0, 0]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()


@serve.deployment
class Generator:
    """The policy: each call generates one whole batch of rows (the ingress forms the batches). A process of its
    own, so generation never competes with HTTP handling for one interpreter lock."""

    def __init__(self, cfg: PipelineConfig, checkpoint: str):
        import torch

        from bp_ray.models.loading import load_causal_lm

        models = cfg.models
        if models.device == "cpu" or not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(cfg.serve.num_cpus_per_replica)))
        self.stream_interval_s = cfg.serve.stream_interval_s
        self.checkpoint = checkpoint
        self.model, self.tokenizer = load_causal_lm(checkpoint, models, device=models.device, dtype=models.dtype)
        self.stats = S.BatchStats()
        logger.info("generator replica up: %s", checkpoint)

    def generate(self, rows: list[GenerationRequest]) -> list[GenerationResult]:
        start = time.perf_counter()
        results = generate(self.model, self.tokenizer, rows)
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.stats.generate_s += time.perf_counter() - start
        return results

    def stream_batch(self, requests: list[GenerationRequest]) -> Iterator[Any]:
        """Each request's new deltas, per stream interval (see generation.stream_batch)."""
        self.stats.stream_batches += 1
        self.stats.stream_rows += rows_in(requests)
        yield from stream_batch(self.model, self.tokenizer, requests, self.stream_interval_s)

    def info(self) -> S.GeneratorInfo:
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica
            replica = "local"
        return S.GeneratorInfo(checkpoint=self.checkpoint, replica=replica, pid=os.getpid(), batching=self.stats)


@serve.deployment
class Scorer:
    """Scores candidate rewrites for best-of-n (serve/ranking.py): rank=reward_model with the learned reward models
    (text only), rank=online by rendering each candidate and scoring the images. Loads only what the config
    enables: the reward models when rm_folder(cfg) finds a folder, Stable Diffusion and the image scorers when
    serve.controls.online_rank."""

    def __init__(self, cfg: PipelineConfig):
        import torch

        from bp_ray.serve.ranking import OnlineScorer, TextScorer, online_setup, rm_folder

        models = cfg.models
        # In a replica: as many torch threads as the CPUs it was given (whichever option the app builder sets them
        # with). Built outside Ray (tests) the process's threads are left alone, and no Ray is started:
        # get_runtime_context() would start one.
        in_replica = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        if in_replica and (models.device == "cpu" or not torch.cuda.is_available()):
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.scorers: dict[str, TextScorer | OnlineScorer] = {}
        folder = rm_folder(cfg)
        if folder is not None:
            self.scorers["reward_model"] = TextScorer(folder, cfg.rewards.alpha, models.device)
        if cfg.serve.controls.online_rank:
            self.scorers["online"] = OnlineScorer(online_setup(cfg))
        # One call per scorer at a time (sync methods run on Serve's thread pool; a diffusers pipeline is not
        # thread-safe), but a lock each, so that text-only ranking never waits behind an online render.
        self.locks = {kind: threading.Lock() for kind in self.scorers}
        logger.info("scorer replica up: %s", ", ".join(self.scorers) or "nothing to score with")

    def kinds(self) -> list[str]:
        """The rank values this replica can score: "reward_model" and/or "online"."""
        return list(self.scorers)

    def score(self, kind: str, prompts: list[str], texts: list[str]) -> list[dict[str, float]]:
        """Per candidate texts[i] of user prompt prompts[i]: {"reward", "pickscore", "aesthetic"} (+ "relevance"
        for online)."""
        scorer = self.scorers.get(kind)
        if scorer is None:
            raise ValueError(f"rank={kind!r} is not available on this endpoint (it can rank with: "
                             f"{', '.join(self.scorers) or 'nothing'})")
        with self.locks[kind]:
            return scorer.score(prompts, texts)
