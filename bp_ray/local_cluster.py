"""A multi-node Ray cluster on one machine, to see how the data job behaves on many nodes without a cluster.

A head with no CPUs (as on a real cluster, nothing but the driver runs there) and worker raylets, each a separate
node with its own CPUs and a custom resource standing in for a GPU node type. The data job's actor pools ask
for a share of that resource, so they can only run on worker nodes. `python -m bp_ray.local_cluster SCENARIO OUT`
runs one scenario and prints a JSON report; the tests and benchmarks/multinode_data.py read it.

    spread  two worker nodes from the start: where did each pool's actors run, how fast
    one     the same job on one worker node (the throughput baseline)
    churn   two worker nodes; once the pools hold actors on both, one is removed mid-job and another added:
            does every row come out exactly once, and do the pools use the new node
    grow    one worker node with room for one actor per pool; after the first commit a second node joins: do
            the pools grow from min_actors onto it (alive actors per pool before and after the join)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_NODE = "gpu_node"
"""The custom resource standing in for a GPU: a worker node offers 1 (the node added mid-churn offers 2) and every
pool actor needs 1, so each node holds one actor, as a one-GPU node holds one model."""
POOLS = ("captioner_pool", "rewriter_pool", "aesthetic_pool")
"""The data job's pools (the aesthetic one runs only when data.aesthetic_threshold is set; not in `tiny`)."""
WORKER_CPUS = 2


def head_processes(temp_dir: str, gcs_port: int) -> list[Any]:
    """Every process of a `ray start --head` we started: those with its private temp dir or its GCS port on their
    command line (`ray start` leaves its daemons to init), and everything they started (workers, agents); never
    this process. psutil.Process objects, so the caller can stop exactly these and no other Ray on the machine."""
    import contextlib
    import os

    import psutil

    marks = (temp_dir, f":{gcs_port}")
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(mark in part for part in process.info["cmdline"] or [] for mark in marks):
                roots.append(process)
    family = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            family.update({child.pid: child for child in root.children(recursive=True)})
    family.pop(os.getpid(), None)
    return list(family.values())


def scenario_config(out: Path, zoo_dir: str | None, rows: int) -> Any:
    from bp_ray.config_loader import load_config

    # One pool per model, each actor on its own "GPU" node: the layout of a GPU cluster (data.fused is for CPUs).
    overrides = ["data.fused=false", f"data.corpus_rows={rows}", "data.max_new_tokens=16",
                 "data.caption_max_new_tokens=8",
                 *(f"data.{pool}.batch_size=8" for pool in POOLS), *(f"data.{pool}.max_actors=2" for pool in POOLS),
                 *(f"data.{pool}.resources={{{GPU_NODE}: 1}}" for pool in POOLS), f"output_dir={out}"]
    if zoo_dir:
        overrides.append(f"models.zoo_dir={zoo_dir}")
    return load_config("tiny", overrides)


def _worker(cluster: Any, gpus: float = 1.0) -> Any:
    return cluster.add_node(num_cpus=WORKER_CPUS, resources={GPU_NODE: gpus})


def alive_actors() -> dict[str, int]:
    """Data-pool actor class -> how many of its actors are alive now."""
    from ray.util.state import list_actors

    alive: dict[str, int] = defaultdict(int)
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
        name = actor.class_name or ""
        if name.startswith("MapWorker("):
            alive[name] += 1
    return dict(alive)


def actor_nodes() -> dict[str, list[str]]:
    """Data-pool actor class -> node ids its actors ran on (dead actors included), from Ray's state API."""
    from ray.util.state import list_actors

    placed: dict[str, list[str]] = defaultdict(list)
    for actor in list_actors(detail=True, limit=10_000, raise_on_missing_output=False):
        name = actor.class_name or ""
        if name.startswith("MapWorker(") and actor.node_id:  # an actor still pending has no node
            placed[name].append(actor.node_id)
    return dict(placed)


def exactly_once(cfg: Any, out: Path) -> dict[str, Any]:
    """Every candidate pair the rows must propose was committed once, and the output holds no repeat."""
    import pandas as pd

    from bp_ray.data import columns as C
    from bp_ray.data import work_store
    from bp_ray.data.pairs import build_candidates
    from bp_ray.data.pipeline import prepare_rows, read_source

    table, _, _ = read_source(cfg.data, out.parent / "corpus")
    rows, _ = prepare_rows(table, cfg.data)
    frame = rows.assign(**{C.CAPTION: "", C.SUMMARY: "", C.EXPANSION: "", C.GEN_ERROR: ""})
    expected = set(build_candidates(frame, cfg.data)[C.PAIR_ID])
    committed = work_store.read_committed(out / "work")
    pairs = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))], ignore_index=True)
    return {"expected": len(expected), "committed": len(committed),
            "committed_unique": bool(committed[C.PAIR_ID].is_unique),
            "all_committed": set(committed[C.PAIR_ID]) == expected, "output_unique": bool(pairs[C.PAIR_ID].is_unique),
            "pairs_out": len(pairs)}


def run(scenario: str, out: Path, zoo_dir: str | None = None, rows: int = 240) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from bp_ray.data import work_store
    from bp_ray.data.pipeline import run_data_generation
    from bp_ray.models.loading import prepare_models
    from bp_ray.ray_runtime import WORKER_ENV

    cfg = scenario_config(out, zoo_dir, rows)
    prepare_models(cfg.models, ("rewriter", "captioner", "aesthetic"))  # before any actor races to build them
    # shutdown_at_exit=False: shut down once, below; Ray's exit hook would try again on half-removed nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0}, shutdown_at_exit=False)
    # grow: one slot per pool, so each pool starts at min_actors and can only grow onto a node that joins
    nodes = {"worker-1": _worker(cluster, gpus=2.0 if scenario == "grow" else 1.0)}
    if scenario in ("spread", "churn"):
        nodes["worker-2"] = _worker(cluster)
    names = {node.node_id: name for name, node in nodes.items()}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": WORKER_ENV}, logging_level="WARNING")
    data_dir = out / "data"
    result: dict[str, Any] = {}

    def job() -> None:
        try:
            result["manifest"] = run_data_generation(cfg.data, cfg.models, cfg.cluster, data_dir)
        except BaseException as exc:  # handed to the main thread, which reports it
            result["error"] = exc

    def committed() -> int:
        return len(work_store.committed_files(data_dir / "work"))

    events: list[str] = []
    pool_sizes: dict[str, dict[str, int]] = defaultdict(lambda: {"before_join": 0, "after_join": 0})
    try:
        started = time.perf_counter()
        # The job runs beside, the cluster changes here: adding a node installs signal handlers (main thread only).
        worker = threading.Thread(target=job, daemon=True)
        worker.start()
        # A restarted actor keeps its id and Ray reports only its latest node: sample placements as the job runs.
        seen: dict[str, set[str]] = defaultdict(set)

        def sample() -> set[str]:
            for cls, ids in actor_nodes().items():
                seen[cls].update(ids)
            return {n for ids in seen.values() for n in ids}

        if scenario == "churn":
            # Remove a node that holds actors as soon as the pools have spread over both and a first batch is
            # committed: later (after two batches), on a quiet machine the pools had finished their work and the
            # displaced actor had nothing left to restart for (seen in CI).
            deadline = time.monotonic() + 120
            while worker.is_alive() and time.monotonic() < deadline and (committed() < 1 or len(sample()) < 2):
                time.sleep(0.5)
            cluster.remove_node(nodes["worker-2"])
            events.append(f"removed worker-2 after {committed()} batches")
            # Two slots: the removed node's actor and any scale-up waiting for room both fit, so no pool starves.
            nodes["worker-3"] = _worker(cluster, gpus=2.0)
            names[nodes["worker-3"].node_id] = "worker-3"
            events.append(f"added worker-3 after {committed()} batches")
        if scenario == "grow":
            deadline = time.monotonic() + 120
            # Join once a batch is committed: by then the bottleneck pool's actor is busy with queued blocks, which
            # is what makes Ray Data grow a pool (joined before that, the pools were seen to stay at one actor).
            while worker.is_alive() and time.monotonic() < deadline and committed() < 1:
                time.sleep(0.5)
            for cls, count in alive_actors().items():
                pool_sizes[cls]["before_join"] = count
            nodes["worker-2"] = _worker(cluster, gpus=2.0)
            names[nodes["worker-2"].node_id] = "worker-2"
            events.append(f"added worker-2 after {committed()} batches")
        while worker.is_alive():
            sample()
            if scenario == "grow":
                for cls, count in alive_actors().items():
                    pool_sizes[cls]["after_join"] = max(pool_sizes[cls]["after_join"], count)
            worker.join(timeout=0.5)
        seconds = time.perf_counter() - started
        if "error" in result:
            raise result["error"]
        manifest = result["manifest"]
        sample()
        placed = {cls: sorted({names.get(n, n) for n in ids}) for cls, ids in seen.items()}
        return {"scenario": scenario, "worker_nodes": sorted(nodes), "events": events, "rows": manifest["rows_in"],
                "rows_processed": manifest["rows_to_process"], "seconds": round(seconds, 2),
                "rows_per_s": round(manifest["rows_to_process"] / seconds, 2), "actors_on": placed,
                "check": exactly_once(cfg, data_dir),
                **({"pool_sizes": dict(pool_sizes)} if scenario == "grow" else {})}
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenario", choices=("spread", "one", "churn", "grow"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--zoo-dir", default=None)
    parser.add_argument("--rows", type=int, default=240)
    args = parser.parse_args(argv)
    report = run(args.scenario, args.out, args.zoo_dir, args.rows)
    print("REPORT " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
