"""Kill a Ray Train worker process once the controller holds a checkpoint, from a thread beside the run."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil


def train_worker_pids() -> set[int]:
    """PIDs of this test process's Ray Train worker actors (Ray renames a pooled worker process when it holds one).

    Only our descendants: the local Ray's raylet is our child and starts the workers, while another test process
    running beside this one (pytest -n 2) has Ray Train workers of its own."""
    pids = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                pids.add(process.pid)
        except psutil.Error:  # it exited while we looked
            continue
    return pids


def registered_checkpoint_step(run_dir: Path) -> int:
    """Step of the latest checkpoint the Ray Train controller has registered (what a restarted group gets).

    A report reaches the controller only at its next poll of the workers, so a worker killed right after
    reporting could restart from the checkpoint before; the controller's snapshot file says what it holds."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return 0


@contextmanager
def worker_killer(run_dir: Path, after_step: int, timeout_s: float = 300) -> Iterator[list[int]]:
    """SIGKILL one of this run's Ray Train workers once a checkpoint of step >= after_step is registered in
    run_dir (<storage>/<run name>); yields the list that receives the killed PID."""
    killed: list[int] = []
    earlier = train_worker_pids()  # an earlier test's workers may still be exiting
    stop = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not stop.is_set():
            if registered_checkpoint_step(run_dir) >= after_step and (pids := train_worker_pids() - earlier):
                victim = max(pids)
                psutil.Process(victim).send_signal(signal.SIGKILL)
                killed.append(victim)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        stop.set()
        thread.join(timeout=5)
