"""Joining or starting Ray the same way in every stage."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from bp_ray.config import ActorPoolConfig, ClusterConfig
from bp_ray.console import PROGRESS_ENV

logger = logging.getLogger(__name__)

# Each worker runs one model on few cores: more threads per worker only oversubscribe them. Ray Train's
# controller notices started and finished workers by polling them, every 2 s by default: measured on 2 cores,
# 0.5 s takes a short SFT run from 14.7 s to 11.2 s.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
              "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def use_held_cpus(num_cpus: float) -> int:
    """Torch threads for a worker that holds `num_cpus` CPUs (at least 1): workers start with OMP_NUM_THREADS=1
    (WORKER_ENV), so an actor given 2 CPUs would otherwise compute on one of them. Returns the thread count."""
    import math

    import torch

    threads = max(1, math.ceil(num_cpus - 1e-9))
    torch.set_num_threads(threads)
    return threads


def init_ray(cluster: ClusterConfig, metrics_export_port: int = 0) -> None:
    """Join cluster.address (or RAY_ADDRESS, set by `ray job submit`), else start a local Ray on loopback, with its
    Prometheus metrics on `metrics_export_port` when that is not 0."""
    import ray

    if ray.is_initialized():
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS") or None
    env_vars = dict(WORKER_ENV)
    # The zoo cache, and the pipeline console's progress file that training workers report their steps to.
    for name in ("BP_RAY_CACHE", PROGRESS_ENV):
        if os.environ.get(name):
            env_vars[name] = os.environ[name]
    # Under `ray job submit`, Ray refuses to merge a variable that the job's runtime env sets too: the job's wins.
    env_vars = {k: v for k, v in env_vars.items() if k not in _job_env_vars()}
    kwargs: dict[str, Any] = {} if address else {"num_cpus": cluster.num_cpus or None, "include_dashboard": False}
    if metrics_export_port and not address:
        kwargs["_metrics_export_port"] = metrics_export_port
    # "local" starts a new instance: with no address Ray would join whatever cluster /tmp/ray/ray_current_cluster
    # names, even a dead one, and then refuse num_cpus.
    ray.init(address=address or "local", runtime_env={"env_vars": env_vars}, logging_level=logging.WARNING,
             **kwargs)
    logger.info("ray: %s", "joined " + address if address else "started a local instance")


def _job_env_vars() -> set[str]:
    """Environment variables the submitted job's runtime env sets (empty outside `ray job submit`)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


def require_resources(cluster: ClusterConfig, cpus: float, gpus: float, what: str) -> None:
    """On a local Ray (no cluster address), fail clearly when `what` can never fit instead of waiting forever;
    a cluster may autoscale, so there Ray's own wait stands."""
    import ray

    if cluster.address or os.environ.get("RAY_ADDRESS"):
        return
    total = ray.cluster_resources()
    have_cpus, have_gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if cpus > have_cpus + 1e-9 or gpus > have_gpus + 1e-9:
        raise RuntimeError(f"{what} needs {cpus:g} CPUs and {gpus:g} GPUs, but this local Ray has {have_cpus:g} "
                           f"CPUs and {have_gpus:g} GPUs: lower the stage's resources (num_workers, "
                           "cpus_per_worker, actor_cpus) or join a cluster (cluster.address)")


def actor_pool_args(pool: ActorPoolConfig) -> dict[str, Any]:
    """map_batches arguments of an autoscaling actor pool (min..max actors) with its per-actor resources."""
    import ray

    return {"compute": ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            "num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "batch_size": pool.batch_size,
            **({"resources": dict(pool.resources)} if pool.resources else {})}
