"""The cluster: joining it, and each stage's simultaneous need against its totals and nodes."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bp_ray.config import ActorPoolConfig, ClusterConfig, PipelineConfig
from bp_ray.preflight.report import HUB_TIMEOUT_S, MISSING, OK, WARN, Check


@dataclass
class Need:
    """What one stage holds at once to make progress. Stages run one after another (the pipeline runs them in
    turn), so the cluster must fit the largest, not their sum."""

    stage: str
    cpus: float = 0.0
    gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources (an actor pool's `resources`, e.g. a node type)."""
    units: list[tuple[str, float, float, dict[str, float]]] = field(default_factory=list)
    """(what, CPUs, GPUs, custom) of one actor or worker: each must fit on one node."""
    parts: list[str] = field(default_factory=list)

    def add(self, what: str, count: int, cpus: float, gpus: float, custom: Mapping[str, float] | None = None) -> None:
        if count <= 0:
            return
        custom = dict(custom or {})
        self.cpus += count * cpus
        self.gpus += count * gpus
        for name, amount in custom.items():
            self.custom[name] = self.custom.get(name, 0.0) + count * amount
        self.units.append((what, cpus, gpus, custom))
        self.parts.append(f"{count} x {what} ({resources_text(cpus, gpus, custom)})")

    def add_pool(self, what: str, pool: ActorPoolConfig) -> None:
        """An autoscaling pool holds at least min_actors actors."""
        self.add(what, pool.min_actors, pool.num_cpus, pool.num_gpus, pool.resources)


def resources_text(cpus: float, gpus: float, custom: Mapping[str, float] | None = None) -> str:
    text = f"{cpus:g} CPU{'' if cpus == 1 else 's'}" + (f", {gpus:g} GPU{'' if gpus == 1 else 's'}" if gpus else "")
    return text + "".join(f", {amount:g} {name}" for name, amount in (custom or {}).items())


def stage_needs(cfg: PipelineConfig) -> list[Need]:
    """Each stage's simultaneous need (and `bp-ray serve`'s at its minimum size), as each stage asks Ray for it:
    the data and reward pools at their min_actors, the Ray Train workers (one GPU each with use_gpu: train/loop.py
    fit), PPO's workers with its reference and reward actors (train/ppo.py run_ppo), the evaluation's reward
    service beside one rewrite task (eval/run.py), Serve's replicas (serve/runner.py start_serve)."""
    d, ppo, s = cfg.data, cfg.ppo, cfg.serve
    data = Need("data")
    if d.fused:
        data.add_pool("fused model stages", d.model_pool)
    else:
        if d.use_captions:
            data.add_pool("captioner", d.captioner_pool)
        if d.use_summaries or d.use_expansions:
            data.add_pool("rewriter", d.rewriter_pool)
        if d.aesthetic_threshold is not None:
            data.add_pool("aesthetic filter", d.aesthetic_pool)

    rewards = Need("rewards")
    if cfg.rewards.fused:
        rewards.add_pool("fused renderer-scorer", d.renderer_pool)
    else:
        rewards.add_pool("renderer", d.renderer_pool)
        rewards.add_pool("scorer", d.scorer_pool)

    training = []
    for name in ("sft", "rm", "ppo"):
        r = getattr(cfg, name).resources
        need = Need(name)
        need.add("train worker", r.num_workers, r.cpus_per_worker, r.gpus_per_worker if r.use_gpu else 0.0)
        training.append(need)
    # K workers share one reference and one reward actor when ppo.workers_per_actor is K (absent or 0: one of each).
    per_actor = ppo.workers_per_actor
    groups = math.ceil(ppo.resources.num_workers / per_actor) if per_actor > 0 else 1
    online = ppo.reward_source == "online"
    training[2].add("reference actor", groups, ppo.actor_cpus, ppo.actor_gpus)
    training[2].add("reward actor", groups, ppo.actor_cpus, ppo.actor_gpus, d.scorer_pool.resources if online else None)
    if ppo.async_rollout:
        training[2].add("rollout actor", ppo.resources.num_workers, ppo.actor_cpus, ppo.actor_gpus)

    # One reward service with the scorer pool's resources, and the rewrite tasks one at a time at least.
    evaluation = Need("eval")
    evaluation.add("reward service", 1, d.scorer_pool.num_cpus, d.scorer_pool.num_gpus, d.scorer_pool.resources)
    if {"sft", "ppo", "llm"} & set(cfg.eval.systems):
        evaluation.add("rewrite task", 1, d.rewriter_pool.num_cpus, d.rewriter_pool.num_gpus, d.rewriter_pool.resources)

    serve = Need("serve")
    serve.add("generator replica", max(1, s.min_replicas), s.num_cpus_per_replica, s.num_gpus_per_replica)
    serve.add("ingress replica", s.ingress_replicas, s.ingress_cpus, 0.0)
    if s.enable_render:
        serve.add("renderer", 1, s.render_cpus, s.render_gpus)
    return [data, rewards, *training, evaluation, serve]


def largest_needs_text(needs: Sequence[Need]) -> str:
    cpus = max(needs, key=lambda n: n.cpus)
    gpus = max(needs, key=lambda n: n.gpus)
    return f"{cpus.cpus:g} CPUs ({cpus.stage}) and {gpus.gpus:g} GPUs ({gpus.stage})"


def shortfalls(need: Need, have: Mapping[str, float]) -> list[str]:
    """What `need` asks beyond `have` (Ray's resource names: CPU, GPU, custom), e.g. ["8 GPUs (has 0)"]."""
    short = []
    for name, amount in (("CPU", need.cpus), ("GPU", need.gpus), *need.custom.items()):
        if amount > have.get(name, 0.0) + 1e-9:
            short.append(f"{amount:g} {name}{'s' if name in ('CPU', 'GPU') and amount != 1 else ''} "
                         f"(has {have.get(name, 0.0):g})")
    return short


def resource_checks(needs: Sequence[Need], totals: Mapping[str, float], nodes: Sequence[Mapping[str, float]],
                    local: bool) -> list[Check]:
    """One check per stage: does its need fit the cluster's totals, and each of its actors on some node. On a local
    Ray a shortfall is MISSING (the stage would wait forever); a cluster may autoscale, so there it is a WARN."""
    checks = []
    bad = MISSING if local else WARN
    fix = ("lower the stage's resources (num_workers, cpus_per_worker, actor_cpus, the pools' num_cpus / num_gpus / "
           "min_actors) or join a cluster (cluster.address)" if local else
           "enough only if the cluster autoscales to it; else add nodes or lower the stage's resources")
    for need in needs:
        asks = f"{resources_text(need.cpus, need.gpus, need.custom)}: {'; '.join(need.parts) or 'nothing'}"
        short = shortfalls(need, totals)
        if short:
            checks.append(Check(f"resources: {need.stage}", bad, f"needs {', '.join(short)}; asks {asks}; {fix}"))
            continue
        no_node = [what for what, cpus, gpus, custom in need.units
                   if not any(not shortfalls(Need("", cpus, gpus, custom), node) for node in nodes)]
        if no_node:
            checks.append(Check(f"resources: {need.stage}", bad, f"no single node fits one {', '.join(no_node)}; asks "
                                                                 f"{asks}; {fix}"))
            continue
        checks.append(Check(f"resources: {need.stage}", OK, f"asks {asks}"))
    return checks


@dataclass
class ClusterNode:
    node_id: str
    ip: str
    resources: dict[str, float]


@dataclass
class ClusterView:
    """The Ray cluster the check joined (or started): totals and alive nodes."""

    address: str
    local: bool
    totals: dict[str, float]
    nodes: list[ClusterNode]


def connect_cluster(cluster: ClusterConfig) -> tuple[Check, ClusterView | None]:
    """Join cluster.address (or RAY_ADDRESS) as the stages do, or, with neither, start the local Ray a stage would
    start; (the check, the cluster or None). An address nobody answers at is reported without waiting out Ray's
    own connection retries (minutes)."""
    import ray

    from bp_ray.ray_runtime import init_ray

    address = cluster.address or os.environ.get("RAY_ADDRESS", "")
    local = address in ("", "local")
    if not local:
        problem = ray_address_problem(address)
        if problem:
            return Check("cluster", MISSING, problem), None
    try:
        init_ray(cluster)
    except Exception as error:  # whatever ray.init raises is what the stages would hit
        return Check("cluster", MISSING, f"cannot {'start a local Ray' if local else 'join ' + address}: {error}"), None
    nodes = [ClusterNode(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"])) for n in ray.nodes() if n["Alive"]]
    view = ClusterView(address, local, dict(ray.cluster_resources()), nodes)
    how = ("started a local Ray for this check (each command starts its own: cluster.address is empty)" if local
           else f"joined {address}" + ("" if "://" in address or address[-1:].isdigit()
                                        else f" ({ray.get_runtime_context().gcs_address})"))
    memory_gib = view.totals.get("memory", 0.0) / 2**30
    return Check("cluster", OK, f"{how}: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, "
                                f"{view.totals.get('CPU', 0):g} CPUs, {view.totals.get('GPU', 0):g} GPUs, "
                                f"{memory_gib:.0f} GiB memory (no stage reserves memory)"), view


START_HINT = ("start one (`ray start --head` here, `ray start --address=<head>:6379` on every other node) or name "
              "it (--set cluster.address=<head>:6379, or RAY_ADDRESS); --set cluster.address= runs the stages on a "
              "local Ray instead")


def ray_address_problem(address: str, timeout_s: float = HUB_TIMEOUT_S) -> str | None:
    """Why nothing will answer at a Ray address (`auto`, host:port, ray://host:port), found with one TCP connection;
    None when something listens there."""
    if address == "auto":
        try:
            # Private, but the only way to learn what "auto" means without connecting: ray.init retries a stale
            # record of a stopped cluster for minutes.
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:
            return None
        try:
            target = canonicalize_bootstrap_address("auto")
        except ConnectionError:  # no running instance to be found
            target = None
        except Exception as error:
            return f"cluster.address=auto: {error}"
        if target is None:
            return f"cluster.address=auto, but no Ray cluster is running on this machine: {START_HINT}"
        where = f"cluster.address=auto finds {target}"
    else:
        target = address.split("://", 1)[-1]
        where = f"cluster.address={address}"
    host, _, port = target.rpartition(":")
    if not port.isdigit():
        return None  # a form ray.init knows better than this check: let it say
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        return f"{where}, but nothing answers there ({error}): {START_HINT}"
    return None
