"""`bp-ray check`: whether a long job has what it needs, answered in seconds before it starts.

Four groups of checks, each a plain function returning `Check` rows (what, OK / WARN / MISSING, a detail that says
how to fix it): every `models.*` role resolves (a registered zoo, an imported GGUF file, a local folder, the
Hugging Face hub or its local cache, the aesthetic head's URL); the prompt data is there; the cluster has the
resources the largest stage asks for; and the run directory and checkpoint storage are writable and shared by
every node. Nothing is downloaded or built, and the hub is asked only until it fails to answer once, so an offline
machine gets its answer in a few seconds.
"""

from __future__ import annotations

from bp_ray.config import PipelineConfig
from bp_ray.preflight.data import check_data
from bp_ray.preflight.models import HubProbe, check_models, model_spec_kind, model_status
from bp_ray.preflight.report import HUB_TIMEOUT_S, MISSING, OK, WARN, Check, format_checks
from bp_ray.preflight.resources import (
    ClusterNode,
    ClusterView,
    connect_cluster,
    largest_needs_text,
    ray_address_problem,
    resource_checks,
    stage_needs,
)
from bp_ray.preflight.storage import check_storage, nodes_not_seeing, shared_path_check

__all__ = ["MISSING", "OK", "WARN", "Check", "ClusterNode", "ClusterView", "HubProbe", "check_data", "format_checks",
           "model_spec_kind", "model_status", "nodes_not_seeing", "ray_address_problem", "resource_checks",
           "run_checks", "shared_path_check", "stage_needs"]


def run_checks(cfg: PipelineConfig, hub_timeout_s: float = HUB_TIMEOUT_S) -> list[Check]:
    """Every check of `cfg`, in report order. Joins (or starts) Ray for the cluster and storage checks and leaves it
    as it found it."""
    import ray

    checks = check_models(cfg, HubProbe.from_env(hub_timeout_s))
    checks += check_data(cfg.data)
    was_running = ray.is_initialized()
    connected, cluster = connect_cluster(cfg.cluster)
    try:
        checks.append(connected)
        needs = stage_needs(cfg)
        if cluster is None:
            checks.append(Check("resources", WARN, f"not compared (no cluster); the stages need at most "
                                                   f"{largest_needs_text(needs)}"))
        else:
            checks += resource_checks(needs, cluster.totals, [n.resources for n in cluster.nodes], cluster.local)
        checks += check_storage(cfg, cluster)
    finally:
        if ray.is_initialized() and not was_running:
            ray.shutdown()
    return checks
