"""Chaos run: the whole pipeline under repeated faults, compared row for row with a clean run.

What it measures, on a `ray start --head` of its own (loopback, private temp dir, free ports, its own auth token)
that every run joins through `cluster.address`, so that killing a driver leaves the cluster standing; the head's
processes are stopped by PID at the end (`ray stop` would stop every Ray on the machine):

1. a clean `bp-ray pipeline --preset tiny` into its own run folder: the reference outputs and wall time;
2. per repeat, a run with a killer beside it that every `--interval` seconds (uniform in MIN..MAX, seeded) SIGKILLs
   one random Ray worker process of the job: a data actor (captioner, rewriter, aesthetic filter, batch writer), a
   renderer (the reward labeller, or evaluation's reward service), a Ray Train worker (SFT, reward models, PPO),
   a PPO actor (reference policy, learned reward, rollout sampler) or an evaluation rewrite task. Victims are
   descendants of this head's raylet whose Ray title names one of those; never the driver, the raylet, the GCS,
   Ray Train's controller or Ray's own service actors;
3. per repeat, a run whose driver (the `bp-ray pipeline` process) is SIGKILLed once, mid-stage, then the same
   command rerun to resume. The stages are taken in a seeded order (so repeats interrupt different ones), each at
   a seeded 20-80% of its clean run's work: committed batches (data), logged steps (sft, rm, ppo), or time
   (rewards, eval).

Each faulty run must exit 0 with every stage's `_SUCCESS.json` and the evaluation's results and report; its pairs
(data/part-*.parquet, by pair_id) and reward labels (rewards/part-*.parquet, by pair_id and role) must equal the
clean run's row for row in every column (paths into the run folder compared as "<run>/..."; the `rendered` flag
only says whether a row came from the cache, and is not compared); and every training metrics file (sft,
rm/<model>, ppo: <stage>/metrics/metrics.csv) must hold each step 1..total_steps exactly once.

Scores are compared exactly by default. Rendering and scoring are deterministic for a given batch: the same
prompts in the same batch give bit-identical images and scores, which is what a retried block or a resumed stage
re-forms on this preset (fixed blocks, one labelling actor taking them in order). Across batch compositions they
are not: batched kernels differ in the last bits, one 8-bit pixel level in a few thousand moves by 1, and scores
by up to 3e-4 (2e-6 for scoring the same images in other batches); `--float-tol` accepts such differences.

It prints one JSON document: the machine (cores, torch threads, Ray and torch versions, load average), kills
attempted and survived per run and the process kinds killed, each run's wall time against the clean run's and the
load average around it (another process on the machine slows a run as much as a fault does), the training
stages' restarts (each manifest's `starts`), the plan each pipeline process logged (skip / resume / run per stage),
and every difference found; `--out FILE` also writes it. Exit status 1 when any faulty run has a difference.

    python benchmarks/chaos.py --repeats 1
    python benchmarks/chaos.py --repeats 3 --interval 20 40 --seed 0 --workdir /tmp/chaos
    python benchmarks/chaos.py --modes driver_kill --driver-kill-stage rewards --workdir /tmp/chaos --reuse-clean

On 2 cores with nothing else running the tiny pipeline takes about 3 min; a faulty run 3-5 min.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

from bp_ray.config_loader import load_config
from bp_ray.local_cluster import head_processes
from bp_ray.stages import STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Ray titles a worker process "ray::<actor class or task>[.<method>]" while it holds that actor or runs that task.
VICTIM_KINDS: dict[str, tuple[str, ...]] = {
    "data_actor": ("(BatchModels)", "(Captioner)", "(PromptRewriter)", "(ImageAesthetic)", "(write_batch)"),
    "renderer": ("(FusedLabeler)", "ray::FusedLabeler", "(Renderer)", "(Scorer)", "ray::RewardService"),
    "train_worker": ("ray::RayTrainWorker",),
    "ppo_actor": ("ray::ReferencePolicy", "ray::LearnedRewardScorer", "ray::RolloutSampler"),
    "eval_task": ("ray::rewrite",),
}
TRAIN_STAGES = ("sft", "rm", "ppo")
PAIR_KEYS = ("pair_id",)
LABEL_KEYS = ("pair_id", "role")
PROVENANCE = frozenset({"rendered"})
"""Columns that say how a row was made (rendered now or read from the cache), not what it is."""


# --- the Ray head ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """`ray start --head` on loopback with a private temp dir; its processes are found by that dir and its GCS port
    and stopped by PID (`ray stop` would stop every Ray on the machine)."""

    def __init__(self, num_cpus: int):
        # Short path: Ray's unix sockets live under the temp dir, with a 107-byte limit on their paths.
        self.temp_dir = tempfile.mkdtemp(prefix="bpc-", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # A token of its own: with ~/.ray/auth_token on the machine (another Ray's), a head without one refuses
        # its own drivers.
        self.env = {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        # The head's daemons hand RAY_ADDRESS to every worker: Ray Train's actors otherwise find their cluster by
        # scanning the machine, and fail when another Ray runs on it.
        started = subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
             f"--num-cpus={num_cpus}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
             f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
            env=self.env, capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")

    def processes(self) -> list[psutil.Process]:
        """Every process of this head: those naming its temp dir or GCS port, and all their descendants."""
        return head_processes(self.temp_dir, self.port)

    def raylet(self) -> psutil.Process | None:
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                if process.name() == "raylet":
                    return process
        return None

    def job_workers(self, kinds: tuple[str, ...]) -> dict[int, tuple[str, str]]:
        """pid -> (kind, Ray title) of the raylet's worker processes that hold a job's actor or task of `kinds`."""
        raylet = self.raylet()
        if raylet is None:
            return {}
        found: dict[int, tuple[str, str]] = {}
        try:
            children = raylet.children(recursive=True)
        except psutil.Error:
            return found
        for process in children:
            try:
                title = " ".join(process.cmdline())
            except psutil.Error:  # it exited while we looked
                continue
            kind = worker_kind(title)
            if kind in kinds:
                found[process.pid] = (kind, title[:120])
        return found

    def stop(self) -> None:
        processes = self.processes()
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(processes, timeout=10)  # Ray's workers often ignore SIGTERM
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def worker_kind(title: str) -> str | None:
    """The victim kind of a Ray worker process title, None for idle workers and Ray's own processes."""
    if not title.startswith("ray::"):
        return None
    return next((kind for kind, marks in VICTIM_KINDS.items() if any(mark in title for mark in marks)), None)


# --- runs ------------------------------------------------------------------------------------------------------------

def current_stage(run: Path) -> str:
    """The first stage of the run folder without its success marker ("done" when all have one)."""
    return next((stage for stage in STAGE_NAMES if not (run / stage / "_SUCCESS.json").exists()), "done")


@dataclass
class Kill:
    at_s: float
    stage: str
    kind: str
    pid: int
    title: str
    delivered: bool


@dataclass
class Attempt:
    """One `bp-ray pipeline` process: its exit code and wall time."""

    exit_code: int | None
    wall_s: float
    log: str


class Pipeline:
    """`bp-ray pipeline --preset P --out RUN` on the head, in its own session, output to a log file."""

    def __init__(self, head: RayHead, preset: str, sets: list[str], run: Path, log: Path):
        self.argv = [str(BIN / "bp-ray"), "pipeline", "--preset", preset, "--out", str(run)]
        for item in (f"cluster.address={head.address}", *sets):
            self.argv += ["--set", item]
        self.env, self.run, self.log = head.env, run, log

    @contextlib.contextmanager
    def started(self) -> Iterator[subprocess.Popen]:
        with self.log.open("a") as out:
            out.write(f"$ {' '.join(self.argv)}\n")
            out.flush()
            process = subprocess.Popen(self.argv, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                yield process
            finally:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def run_once(self, timeout_s: float) -> Attempt:
        start = time.monotonic()
        with self.started() as process:
            try:
                code: int | None = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None  # killed on the way out of `started`
        return Attempt(code, round(time.monotonic() - start, 1), str(self.log))


class WorkerKiller:
    """A thread that SIGKILLs a random job worker of `kinds` every MIN..MAX seconds until stopped."""

    def __init__(self, head: RayHead, run: Path, kinds: tuple[str, ...], interval: tuple[float, float], seed: int):
        self.head, self.run, self.kinds, self.interval = head, run, kinds, interval
        self.rng = random.Random(seed)
        self.kills: list[Kill] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.began = 0.0

    def __enter__(self) -> WorkerKiller:
        self.began = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while not self.stop_event.wait(self.rng.uniform(*self.interval)):
            # Between stages no job worker may be up: wait for the next one rather than skip this kill.
            while not self.stop_event.is_set():
                workers = self.head.job_workers(self.kinds)
                if workers:
                    break
                time.sleep(0.25)
            else:
                return
            pid = self.rng.choice(sorted(workers))
            kind, title = workers[pid]
            stage = current_stage(self.run)
            try:
                os.kill(pid, signal.SIGKILL)
                delivered = True
            except ProcessLookupError:
                delivered = False
            self.kills.append(Kill(round(time.monotonic() - self.began, 1), stage, kind, pid, title, delivered))


def stage_progress(run: Path, stage: str) -> int | None:
    """Work a stage has done so far, in units a run of it always reaches: committed batches of the data stage,
    logged steps of a training stage (summed over the reward models); None for stages measured by time."""
    if stage == "data":
        return len(list((run / "data" / "work").glob("batch-*.parquet")))
    if stage in TRAIN_STAGES:
        total = 0
        for path in (run / stage).glob("**/metrics/metrics.csv"):
            with contextlib.suppress(OSError, ValueError, pd.errors.EmptyDataError):
                total += len(pd.read_csv(path))
        return total
    return None


@dataclass
class DriverKillPlan:
    """Kill the driver in `stage` once it has done `fraction` of the clean run's work there (batches or steps; for
    the reward labels and the evaluation, of its clean duration)."""

    stage: str
    fraction: float
    clean_units: int | None
    clean_s: float

    def due(self, run: Path, entered: float) -> bool:
        if self.clean_units:
            return (stage_progress(run, self.stage) or 0) >= self.fraction * self.clean_units
        return time.monotonic() - entered >= self.fraction * self.clean_s


def driver_kill_plans(clean: Path, rng: random.Random, repeats: int, stage: str | None) -> list[DriverKillPlan]:
    """One plan per repeat: the stages with work to interrupt in a seeded order (repeats cover different stages),
    each at a seeded 20-80% of its work."""
    durations = {s: float(read_json(clean / s / "manifest.json").get("wall_time_s", 0.0)) for s in STAGE_NAMES}
    choices = [s for s in STAGE_NAMES if s != "corpus" and durations[s] > 2]
    order = [stage] if stage else rng.sample(choices, len(choices))
    plans = []
    for repeat in range(repeats):
        chosen = order[repeat % len(order)]
        plans.append(DriverKillPlan(chosen, round(rng.uniform(0.2, 0.8), 2), stage_progress(clean, chosen),
                                    durations[chosen]))
    return plans


def kill_driver_then_resume(pipeline: Pipeline, head: RayHead, plan: DriverKillPlan,
                            timeout_s: float) -> dict[str, Any]:
    """Run, SIGKILL the driver when `plan` says, wait for Ray to end the job's workers, run the same command again."""
    start = time.monotonic()
    killed: dict[str, Any] = {"plan": asdict(plan), "delivered": False}
    with pipeline.started() as process:
        marker, entered = pipeline.run / plan.stage / "_STARTED.json", None
        while process.poll() is None and time.monotonic() - start < timeout_s:
            if entered is None and marker.exists():
                entered = time.monotonic()
            if entered is not None and plan.due(pipeline.run, entered):
                killed.update(stage=current_stage(pipeline.run), at_s=round(time.monotonic() - start, 1),
                              stage_progress=stage_progress(pipeline.run, plan.stage))
                os.killpg(process.pid, signal.SIGKILL)  # the driver and anything it started: all this job's
                killed["delivered"] = True
                break
            time.sleep(0.1)
        first_code = process.wait()
    first_s = time.monotonic() - start
    # The raylet ends a dead driver's workers; a rerun that started beside them would share the 2 cores.
    cleanup = time.monotonic()
    while head.job_workers(tuple(VICTIM_KINDS)) and time.monotonic() - cleanup < 120:
        time.sleep(0.5)
    killed["job_workers_gone_after_s"] = round(time.monotonic() - cleanup, 1)
    killed["job_workers_left"] = len(head.job_workers(tuple(VICTIM_KINDS)))
    rerun = pipeline.run_once(timeout_s)
    return {"kill": killed, "first_exit_code": first_code, "first_s": round(first_s, 1),
            "rerun_exit_code": rerun.exit_code, "rerun_s": rerun.wall_s}


# --- checks ----------------------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def read_parts(run: Path, stage: str) -> pd.DataFrame:
    """A stage's part-*.parquet files as one table, the run folder's path in any text replaced by "<run>" (pairs
    name their corpus image by its absolute path)."""
    files = sorted((run / stage).glob("part-*.parquet"))
    if not files:
        return pd.DataFrame()
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    for column in frame.columns:
        if pd.api.types.is_string_dtype(frame[column]) and frame[column].map(lambda v: isinstance(v, str)).all():
            frame[column] = frame[column].str.replace(str(run), "<run>", regex=False)
    return frame


def _numbers(column: pd.Series) -> np.ndarray | None:
    """A numeric column, or one of equal-length arrays (per-seed scores), as a float array; None otherwise."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype=float)
    if len(column) and isinstance(column.iloc[0], np.ndarray | list):
        with contextlib.suppress(ValueError, TypeError):
            return np.stack([np.asarray(v, dtype=float) for v in column])
    return None


def compare_frames(name: str, got: pd.DataFrame, want: pd.DataFrame, keys: tuple[str, ...],
                   float_tol: float) -> tuple[list[str], dict[str, Any]]:
    """Differences between a faulty run's table and the clean run's, matched on `keys`; and figures about them."""
    keys_list = list(keys)
    info: dict[str, Any] = {"rows": len(got), "clean_rows": len(want)}
    if got.empty or want.empty:
        return [f"{name}: no rows (faulty {len(got)}, clean {len(want)})"], info
    diffs = []
    for label, frame in (("faulty", got), ("clean", want)):
        duplicated = int(frame.duplicated(keys_list).sum())
        if duplicated:
            diffs.append(f"{name}: {duplicated} rows of the {label} run repeat a {'/'.join(keys)}")
    have = set(got[keys_list].itertuples(index=False, name=None))
    need = set(want[keys_list].itertuples(index=False, name=None))
    if need - have:
        diffs.append(f"{name}: {len(need - have)} clean rows missing, e.g. {sorted(need - have)[:3]}")
    if have - need:
        diffs.append(f"{name}: {len(have - need)} rows not in the clean run, e.g. {sorted(have - need)[:3]}")
    if set(got.columns) != set(want.columns):
        diffs.append(f"{name}: columns differ: {sorted(set(got.columns) ^ set(want.columns))}")
    columns = [c for c in want.columns if c in got.columns and c not in keys and c not in PROVENANCE]
    both = want.drop_duplicates(keys_list).merge(got.drop_duplicates(keys_list), on=keys_list,
                                                suffixes=("_clean", "_faulty"))
    close: dict[str, float] = {}
    for column in columns:
        a, b = both[f"{column}_clean"], both[f"{column}_faulty"]
        x, y = _numbers(a), _numbers(b)
        if x is not None and y is not None and x.shape == y.shape:
            off = ~((x == y) | (np.isnan(x) & np.isnan(y)))
            rows = off.reshape(len(x), -1).any(axis=1)
            if rows.any():
                worst = float(np.nanmax(np.abs(x - y)))
                if worst <= float_tol:
                    close[column] = worst
                else:
                    examples = both.loc[rows, keys_list].head(2).values.tolist()
                    diffs.append(f"{name}: {column} differs in {int(rows.sum())} of {len(rows)} rows "
                                 f"(max abs diff {worst:.3g}), e.g. {examples}")
        else:
            off = (a.astype(str) != b.astype(str)).to_numpy()
            if off.any():
                diffs.append(f"{name}: {column} differs in {int(off.sum())} of {len(off)} rows, e.g. "
                             f"{both.loc[off, keys_list].head(2).values.tolist()}")
    if close:
        info["within_float_tol"] = close
    return diffs, info


def metrics_files(run: Path) -> list[Path]:
    """Every training metrics file of a run (<stage>[/<model>]/metrics/metrics.csv), Ray's own folders left out."""
    return sorted(p for p in run.rglob("metrics/metrics.csv") if "ray" not in p.relative_to(run).parts)


def check_metrics(run: Path, clean: Path) -> tuple[list[str], dict[str, Any]]:
    """Each metrics file logs steps 1..total_steps (its manifest's) once each, as the clean run's does."""
    diffs, info = [], {}
    files = {str(p.relative_to(run)): p for p in metrics_files(run)}
    expected = {str(p.relative_to(clean)) for p in metrics_files(clean)}
    for missing in sorted(expected - set(files)):
        diffs.append(f"metrics: {missing} missing")
    for rel, path in files.items():
        manifest = read_json(path.parent.parent / "manifest.json")
        total = int(manifest.get("total_steps", 0))
        steps = pd.read_csv(path)["step"].astype(int).tolist()
        counts = Counter(steps)
        repeated = sorted(s for s, n in counts.items() if n > 1)
        missing = sorted(set(range(1, total + 1)) - set(counts))
        extra = sorted(set(counts) - set(range(1, total + 1)))
        info[rel] = {"rows": len(steps), "total_steps": total, "starts": manifest.get("starts")}
        if repeated:
            diffs.append(f"metrics: {rel} logs steps {repeated[:10]} more than once")
        if missing:
            diffs.append(f"metrics: {rel} misses steps {missing[:10]} ({len(missing)} of {total})")
        if extra:
            diffs.append(f"metrics: {rel} logs steps past total_steps {total}: {extra[:10]}")
        if not repeated and steps != sorted(steps):
            diffs.append(f"metrics: {rel} steps out of order")
    return diffs, info


def final_metric_drift(run: Path, clean: Path) -> dict[str, float]:
    """|final loss/train (or reward) - the clean run's| per training stage: not a check (a restart from a checkpoint
    trains on the same batches, a resumed run may train on labels a few float bits apart), a figure."""
    drift = {}
    for manifest in sorted(clean.glob("*/manifest.json")) + sorted(clean.glob("rm/*/manifest.json")):
        rel = manifest.relative_to(clean)
        want = read_json(manifest).get("final_metrics", {})
        got = read_json(run / rel).get("final_metrics", {})
        key = "loss/train" if "loss/train" in want else "reward/combined"
        if rel.parts[0] in TRAIN_STAGES and key in want and key in got:
            drift[f"{rel.parent}:{key}"] = abs(float(got[key]) - float(want[key]))
    return drift


def check_run(run: Path, clean: Path, exit_code: int | None, float_tol: float) -> tuple[list[str], dict[str, Any]]:
    """Every difference between a faulty run and the clean one (empty: the faults changed nothing), and figures."""
    diffs: list[str] = []
    info: dict[str, Any] = {}
    if exit_code != 0:
        diffs.append(f"exit code {exit_code}" if exit_code is not None else "timed out")
    for stage in STAGE_NAMES:
        if not (run / stage / "_SUCCESS.json").exists():
            diffs.append(f"{stage}: no _SUCCESS.json")
    for name in ("results.json", "report.html"):
        if not (run / "eval" / name).exists():
            diffs.append(f"eval: no {name}")
    systems = [row.get("system") for row in read_json(run / "eval" / "results.json").get("table", [])]
    if systems != [row.get("system") for row in read_json(clean / "eval" / "results.json").get("table", [])]:
        diffs.append(f"eval: systems {systems} differ from the clean run's")
    for name, folder, keys in (("pairs", "data", PAIR_KEYS), ("labels", "rewards", LABEL_KEYS)):
        found, figures = compare_frames(name, read_parts(run, folder), read_parts(clean, folder), keys, float_tol)
        diffs += found
        info[name] = figures
    found, info["metrics"] = check_metrics(run, clean)
    diffs += found
    info["final_metric_drift_vs_clean"] = final_metric_drift(run, clean)
    info["plans"] = [line.split("pipeline plan: ", 1)[1].strip()
                     for line in (run / "logs" / "bp-ray.log").read_text(errors="replace").splitlines()
                     if "pipeline plan: " in line] if (run / "logs" / "bp-ray.log").exists() else []
    return diffs, info


# --- main ------------------------------------------------------------------------------------------------------------

def machine_facts() -> dict[str, Any]:
    import ray
    import torch

    return {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "torch_threads_driver": torch.get_num_threads(),
            "torch_threads_ray_workers": "1 (OMP_NUM_THREADS=1, bp_ray.ray_runtime.WORKER_ENV; Train workers set "
                                         "ceil(cpus_per_worker))",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "platform": platform.platform()}


@dataclass
class RunReport:
    mode: str
    repeat: int
    run_dir: str
    completed: bool = False
    wall_s: float = 0.0
    wall_vs_clean: float = 0.0
    kills_attempted: int = 0
    kills_survived: int = 0
    killed_kinds: dict[str, int] = field(default_factory=dict)
    kills: list[dict[str, Any]] = field(default_factory=list)
    driver: dict[str, Any] = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def summarize(reports: list[RunReport]) -> dict[str, Any]:
    summary = {}
    for mode in ("worker_kills", "driver_kill"):
        mine = [r for r in reports if r.mode == mode]
        if not mine:
            continue
        kinds: Counter[str] = Counter()
        for report in mine:
            kinds.update(report.killed_kinds)
        summary[mode] = {"runs": len(mine), "completed": sum(r.completed for r in mine),
                         "no_differences": sum(not r.differences for r in mine),
                         "kills_attempted": sum(r.kills_attempted for r in mine),
                         "kills_survived": sum(r.kills_survived for r in mine), "killed_kinds": dict(kinds),
                         "wall_vs_clean": spread([r.wall_vs_clean for r in mine]),
                         "differences": sum(len(r.differences) for r in mine)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--repeats", type=int, default=1, help="faulty runs of each kind")
    parser.add_argument("--interval", type=float, nargs=2, default=(20.0, 40.0), metavar=("MIN", "MAX"),
                        help="seconds between worker kills, uniform (default 20 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(VICTIM_KINDS),
                        help=f"worker kinds the killer picks from (default all: {','.join(VICTIM_KINDS)})")
    parser.add_argument("--driver-kill-stage", default=None, choices=[s for s in STAGE_NAMES if s != "corpus"],
                        help="stage to kill the driver in (default: a seeded random one per repeat)")
    parser.add_argument("--modes", default="worker_kills,driver_kill")
    parser.add_argument("--float-tol", type=float, default=0.0,
                        help="accept score differences up to this (default 0: exact)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pipeline process")
    parser.add_argument("--workdir", default=None, help="run folders and logs (default: a new /tmp/chaos-* folder)")
    parser.add_argument("--out", default=None, help="also write the JSON summary here")
    parser.add_argument("--reuse-clean", action="store_true",
                        help="reuse WORKDIR/clean when an earlier call left it complete (its clean.json)")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = set(kinds) - set(VICTIM_KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; known: {', '.join(VICTIM_KINDS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.preset, args.overrides)
    facts = machine_facts()
    # The zoo is built here, once: otherwise the clean run's time would hold its build.
    subprocess.run([str(BIN / "bp-ray"), "models", "build-tiny", "--preset", args.preset,
                    *[a for item in args.overrides for a in ("--set", item)]], check=True, capture_output=True)
    result: dict[str, Any] = {
        "benchmark": "chaos", "machine": facts,
        "settings": {"preset": args.preset, "overrides": args.overrides, "repeats": args.repeats,
                     "interval_s": list(args.interval), "seed": args.seed, "kinds": list(kinds), "modes": modes,
                     "float_tol": args.float_tol, "head_cpus": cfg.cluster.num_cpus or os.cpu_count(),
                     "workdir": str(work)},
    }
    head = RayHead(cfg.cluster.num_cpus or os.cpu_count() or 1)
    reports: list[RunReport] = []
    try:
        clean = work / "clean"
        earlier = read_json(work / "clean.json") if args.reuse_clean else {}
        if earlier and not earlier.get("problems") and not check_run(clean, clean, 0, 0.0)[0]:
            result["clean"] = {**earlier, "reused": True}
        else:
            shutil.rmtree(clean, ignore_errors=True)
            (work / "clean.log").unlink(missing_ok=True)
            load = os.getloadavg()[0]
            attempt = Pipeline(head, args.preset, args.overrides, clean, work / "clean.log").run_once(args.timeout)
            result["clean"] = {"run_dir": str(clean), "exit_code": attempt.exit_code, "wall_s": attempt.wall_s,
                               "load_avg_1m_start_end": [round(load, 2), round(os.getloadavg()[0], 2)],
                               "problems": check_run(clean, clean, attempt.exit_code, 0.0)[0],
                               "stage_s": {s: read_json(clean / s / "manifest.json").get("wall_time_s")
                                           for s in STAGE_NAMES}}
            (work / "clean.json").write_text(json.dumps(result["clean"], indent=1))
        clean_diffs = result["clean"]["problems"]
        if clean_diffs:
            raise SystemExit(json.dumps(result, indent=1) + "\nthe clean run failed: nothing to compare with")
        plans = driver_kill_plans(clean, random.Random(args.seed), args.repeats, args.driver_kill_stage)
        for repeat in range(1, args.repeats + 1):
            for mode in modes:
                run = work / f"{mode}-{repeat}"
                shutil.rmtree(run, ignore_errors=True)
                (work / f"{mode}-{repeat}.log").unlink(missing_ok=True)
                pipeline = Pipeline(head, args.preset, args.overrides, run, work / f"{mode}-{repeat}.log")
                report = RunReport(mode, repeat, str(run))
                load = os.getloadavg()[0]
                if mode == "worker_kills":
                    with WorkerKiller(head, run, kinds, tuple(args.interval), args.seed * 1000 + repeat) as killer:
                        attempt = pipeline.run_once(args.timeout)
                    exit_code, report.wall_s = attempt.exit_code, attempt.wall_s
                    delivered = [k for k in killer.kills if k.delivered]
                    report.kills = [asdict(k) for k in killer.kills]
                    report.kills_attempted = len(killer.kills)
                    report.killed_kinds = dict(Counter(k.kind for k in delivered))
                else:
                    report.driver = kill_driver_then_resume(pipeline, head, plans[repeat - 1], args.timeout)
                    exit_code = report.driver["rerun_exit_code"]
                    report.wall_s = round(report.driver["first_s"] + report.driver["rerun_s"], 1)
                    report.kills_attempted = int(report.driver["kill"]["delivered"])
                    report.killed_kinds = {"driver": report.kills_attempted}
                report.differences, report.figures = check_run(run, clean, exit_code, args.float_tol)
                # Another process on the machine slows a run as much as a fault: the load says which.
                report.figures["load_avg_1m_start_end"] = [round(load, 2), round(os.getloadavg()[0], 2)]
                # Completed: exit 0 and every stage marked done; the data checks are its differences.
                report.completed = exit_code == 0 and all((run / s / "_SUCCESS.json").exists() for s in STAGE_NAMES)
                report.kills_survived = sum(report.killed_kinds.values()) if report.completed else 0
                report.wall_vs_clean = round(report.wall_s / max(result["clean"]["wall_s"], 1e-9), 2)
                reports.append(report)
                print(f"[chaos] {mode} #{repeat}: {'ok' if not report.differences else 'DIFFERENCES'}, "
                      f"{report.kills_attempted} kill(s), {report.wall_s:.0f} s", file=sys.stderr, flush=True)
    finally:
        head.stop()
    facts["load_avg_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
    result["runs"] = [asdict(r) for r in reports]
    result["summary"] = summarize(reports)
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if all(not r.differences for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
