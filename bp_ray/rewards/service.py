"""The reward service: `score(prompts, intents) -> rewards` for PPO's online reward and for evaluation.

Concurrent callers' requests are gathered into batches (up to rewards.service_max_batch prompts, waiting at
most rewards.service_batch_wait_s for company), rendered and scored by one RewardLabeler, and answered each
with its own slice. `BatchingScorer` is the plain asyncio core; `RewardService` is the thin Ray actor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from bp_ray.config import ActorPoolConfig
from bp_ray.rewards.labeler import RewardSetup
from bp_ray.rewards.scoring import combined_reward, seed_stats

LabelFn = Callable[[list[str], list[str], bool], tuple[np.ndarray, np.ndarray | None]]
"""(prompts, intents, keep_pixels) -> (P, S, 3) per-seed scores, and the (P, S, H, W, 3) images when asked for."""


class BatchingScorer:
    """Collects concurrent requests into batches for a blocking label function run in a worker thread."""

    def __init__(self, label_fn: LabelFn, alpha: float, max_batch: int, wait_s: float):
        self.label_fn, self.alpha, self.max_batch, self.wait_s = label_fn, alpha, max_batch, wait_s
        self.pending: list[tuple[list[str], list[str], bool, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None
        self.calls = 0
        self.batches = 0

    async def scores(self, prompts: list[str], intents: list[str]) -> np.ndarray:
        """(P, S, 3) per-seed scores of this request."""
        scores, _ = await self.scores_and_images(prompts, intents, keep_pixels=False)
        return scores

    async def scores_and_images(self, prompts: list[str], intents: list[str],
                                keep_pixels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(P, S, 3) per-seed scores of this request and, with keep_pixels, its (P, S, H, W, 3) images."""
        if len(prompts) != len(intents):
            raise ValueError(f"got {len(prompts)} prompts but {len(intents)} intents")
        if not prompts:
            return np.zeros((0, 0, 3)), None
        self.calls += 1
        future = asyncio.get_running_loop().create_future()
        self.pending.append((list(prompts), list(intents), keep_pixels, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())
        return await future

    async def rewards(self, prompts: list[str], intents: list[str]) -> list[float]:
        """Combined reward per prompt: alpha * mean PickScore + (1 - alpha) * mean aesthetic over seeds."""
        scores = await self.scores(prompts, intents)
        if not len(scores):
            return []
        pick, _ = seed_stats(scores[:, :, 0])
        aesthetic, _ = seed_stats(scores[:, :, 1])
        return combined_reward(pick, aesthetic, self.alpha).tolist()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            await asyncio.sleep(self.wait_s)  # let concurrent callers join this batch
            batch, size = [], 0
            while self.pending and (not batch or size + len(self.pending[0][0]) <= self.max_batch):
                request = self.pending.pop(0)
                batch.append(request)
                size += len(request[0])
            prompts = [p for request in batch for p in request[0]]
            intents = [i for request in batch for i in request[1]]
            keep_pixels = any(request[2] for request in batch)
            self.batches += 1
            try:
                scores, pixels = await loop.run_in_executor(None, self.label_fn, prompts, intents, keep_pixels)
            except Exception as exc:  # one failing batch fails its callers, not the service
                for *_, future in batch:
                    future.set_exception(exc)
                continue
            start = 0
            for request_prompts, _, wants_pixels, future in batch:
                end = start + len(request_prompts)
                future.set_result((scores[start:end], pixels[start:end] if wants_pixels else None))
                start = end


class RewardService:
    """Ray actor (create with `reward_service(setup, pool, cache_path)`): one labeler, batched across callers."""

    def __init__(self, setup: RewardSetup, cache_path: str | None, num_cpus: float = 1):
        from bp_ray.ray_runtime import use_held_cpus
        from bp_ray.rewards.labeler import RewardLabeler

        use_held_cpus(num_cpus)
        self.labeler = RewardLabeler(setup, cache_path)
        self.core = BatchingScorer(self._label, setup.rewards.alpha, setup.rewards.service_max_batch,
                                   setup.rewards.service_batch_wait_s)

    def _label(self, prompts: list[str], intents: list[str], keep_pixels: bool) -> tuple[np.ndarray, np.ndarray | None]:
        labels = self.labeler.label(prompts, intents, keep_pixels=keep_pixels)
        return labels.scores, labels.pixels

    async def score(self, prompts: list[str], intents: list[str]) -> list[float]:
        return await self.core.rewards(prompts, intents)

    async def score_detailed(self, prompts: list[str], intents: list[str]) -> np.ndarray:
        return await self.core.scores(prompts, intents)

    async def score_rewrites(self, lows: list[str], highs: list[str]) -> dict[str, np.ndarray]:
        """PPO's reward interface (as the learned reward's): per rewrite, the seed means of PickScore, aesthetic
        and the CLIP relevance of its renders to the user prompt, and the combined reward."""
        means = np.asarray(await self.core.scores(highs, lows), dtype=np.float64).reshape(len(highs), -1, 3)
        means = means.mean(axis=1) if means.shape[1] else np.zeros((len(highs), 3))
        return {"pickscore": means[:, 0], "aesthetic": means[:, 1], "relevance": means[:, 2],
                "reward": combined_reward(means[:, 0], means[:, 1], self.core.alpha)}

    async def score_with_images(self, prompts: list[str], intents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-seed scores and the images. Images of prompts served from the cache are zeros: evaluation, which
        needs every image, runs its service without a cache."""
        return await self.core.scores_and_images(prompts, intents, keep_pixels=True)

    def stats(self) -> dict[str, int]:
        cache = self.labeler.cache.stats() if self.labeler.cache is not None else {}
        return {"calls": self.core.calls, "batches": self.core.batches, **cache}


def reward_service(setup: RewardSetup, pool: ActorPoolConfig, cache_path: str | None, num_gpus: float | None = None,
                   num_cpus: float | None = None, max_restarts: int = 3):
    """Start the reward actor (by default with the pool's resources: the scorer pool's); returns its handle.

    A killed service comes back up to `max_restarts` times and the requests it had not answered are sent again (an
    answer depends only on the request), so its callers (PPO's workers, the evaluation) wait instead of failing."""
    import ray

    cpus = pool.num_cpus if num_cpus is None else num_cpus
    actor = ray.remote(RewardService).options(num_cpus=cpus, num_gpus=pool.num_gpus if num_gpus is None else num_gpus,
                                              resources=dict(pool.resources) or None, max_concurrency=64,
                                              max_restarts=max_restarts, max_task_retries=max_restarts)
    return actor.remote(setup, cache_path, cpus)
