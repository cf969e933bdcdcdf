"""Whether the run directory and checkpoint storage are writable and seen by every node."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bp_ray.config import PipelineConfig
from bp_ray.preflight.report import MISSING, NODE_TIMEOUT_S, OK, URI_TIMEOUT_S, WARN, Check
from bp_ray.preflight.resources import ClusterNode, ClusterView


def check_storage(cfg: PipelineConfig, cluster: ClusterView | None) -> list[Check]:
    """The run directory (every stage writes there, Ray Data tasks included) and cluster.storage_path (Ray Train
    checkpoints; empty: under the run directory): writable, and the same files on every alive node."""
    paths = {"storage: output_dir": cfg.output_dir}
    if cfg.cluster.storage_path:
        paths["storage: cluster.storage_path"] = cfg.cluster.storage_path
    return [uri_check(what, path) if "://" in path else shared_path_check(what, path, cluster)
            for what, path in paths.items()]


def uri_check(what: str, uri: str, timeout_s: float = URI_TIMEOUT_S) -> Check:
    """An s3:// or gs:// prefix listed with pyarrow.fs (as Ray Train will write it) in a child process, so that a
    client retrying for minutes can be stopped."""
    code = ("import sys, pyarrow.fs as f; fs, p = f.FileSystem.from_uri(sys.argv[1]); "
            "fs.get_file_info(f.FileSelector(p, allow_not_found=True))")
    try:
        done = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Check(what, MISSING, f"{uri}: no answer in {timeout_s:g} s (network, region or credentials?)")
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return Check(what, MISSING, f"{uri}: cannot list it: {last}")
    return Check(what, OK, f"{uri}: listable from here (every node needs the same credentials)")


def writable_folder(path: Path) -> tuple[Path, str]:
    """(the folder a probe file can go in: `path`, else its nearest existing parent, which the first stage creates
    it in; why it cannot be written, or "")."""
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return folder, f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return folder, f"{folder} is not writable"
    return folder, ""


def shared_path_check(what: str, path_text: str, cluster: ClusterView | None) -> Check:
    """A local path: writable here, and on a multi-node cluster a file written here is seen by every alive node (a
    zero-CPU task pinned to each reads it back)."""
    path = Path(path_text).expanduser().resolve()  # Ray workers run in other working directories
    folder, problem = writable_folder(path)
    where = path_text if folder == path else f"{path_text} (not there yet, to be created under {folder})"
    if problem:
        return Check(what, MISSING, f"{where}: {problem}: mount the storage there or point {what.split(': ')[1]} at "
                                    "a writable folder")
    if cluster is None:
        return Check(what, WARN, f"{where}: writable here; whether every node shares it was not checked (no cluster)")
    if len(cluster.nodes) <= 1:
        return Check(what, OK, f"{where}: writable; 1 node: shared trivially")
    token = uuid.uuid4().hex
    probe = folder / f".bp-ray-check-{token}"
    try:
        probe.write_text(token)
        blind = nodes_not_seeing(probe, token, cluster.nodes)
    except OSError as error:
        return Check(what, MISSING, f"{where}: cannot write a file there: {error}")
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        return Check(what, MISSING, f"{where}: not shared: node(s) {', '.join(blind)} cannot read a file written "
                                    "here; put it on storage every node mounts (NFS) at the same path, or use "
                                    "s3:// / gs:// for cluster.storage_path")
    return Check(what, OK, f"{where}: writable, and all {len(cluster.nodes)} nodes read the same files")


def nodes_not_seeing(probe: Path, token: str, nodes: Sequence[ClusterNode],
                     timeout_s: float = NODE_TIMEOUT_S) -> list[str]:
    """IPs of the nodes where `probe` cannot be read back as `token` (or whose task did not answer in time)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Defined here, not at module level, so that cloudpickle sends it by value: a node without bp-ray installed
    # (or another version of it) can still run it.
    def read(path: str) -> str:
        try:
            with open(path) as handle:
                return handle.read()
        except OSError:
            return ""

    task = ray.remote(read)
    refs = {task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node.node_id, soft=False)).remote(str(probe)): node for node in nodes}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    seen = {refs[ref].node_id for ref in ready if _get_or_empty(ref) == token}
    return [node.ip for node in nodes if node.node_id not in seen]


def _get_or_empty(ref: Any) -> str:
    import ray

    try:
        return ray.get(ref)
    except Exception:  # a task that failed on its node: that node did not read the file
        return ""
