"""The generator deployment autoscales: under load it goes from 1 replica to 2, and back to 1 once the load stops,
while every request is answered 200 or 503 (never another status, an error or a hang).

The endpoint runs in its own process (`serve_replica_log.py`: `bp-ray serve`'s own start and stop, plus a log of
the Generator's replica states read from `serve.status()`), on the tiny preset, with delays of seconds instead of
Serve's production defaults (30 s up, 600 s down). Every wait has a deadline, so the test ends by itself: about
1.5-2 minutes on 2 busy cores, at worst START_S + UPSCALE_S + HOLD_S + CLIENT_TIMEOUT_S + DOWNSCALE_S + the shutdown.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.serve_process import ServeProcess, free_port, start

pytestmark = pytest.mark.integration

MODEL = "bp-ray-beautifier"
# 2 cores: a 0.25-CPU ingress and two 0.5-CPU generator replicas fit, the renderer is off. Up to two batches in
# flight (max_concurrent_batches = max_replicas) on one replica are twice target_ongoing_requests: that is what
# makes Serve add the second replica. Set here, not taken from the preset, so a preset change cannot void the test.
SERVE = {"enable_render": "false", "min_replicas": 1, "max_replicas": 2, "max_concurrent_batches": 2,
         "target_ongoing_requests": 1, "num_cpus_per_replica": 0.5, "ingress_cpus": 0.25, "max_batch_size": 32,
         "max_ongoing_requests": 32, "max_queued_requests": 64, "request_timeout_s": 30,
         # Seconds, not minutes: metrics every 0.5 s averaged over 2 s; 1 s above target adds a replica, 4 s
         # below removes it (longer than the gap between two batches, so a loaded replica is not removed).
         "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2, "metrics_interval_s": 0.5}
CLIENTS = 24
"""Closed-loop clients: enough to keep both batch slots full (the benchmark splits 32 clients into two batches)."""
MAX_TOKENS = 64
"""/v1/completions has no stop string, so rows run their 64 tokens: batches long enough to overlap."""
CLIENT_TIMEOUT_S = 45.0
"""Past the server's own request_timeout_s (30 s, answered 504): no answer by then is a hang."""
START_S = 120.0
"""`bp-ray serve` ready (measured 51 s on 2 loaded cores)."""
UPSCALE_S = 75.0
"""Load start to 2 running replicas: the decision takes seconds, the new replica loading the model on cores that
the load keeps busy takes longer (measured 20 s)."""
HOLD_S = 5.0
"""Load kept on 2 running replicas: more than downscale_delay_s, so a replica removed under load would show."""
DOWNSCALE_S = 45.0
"""Load end to 1 running replica: look_back_period_s + downscale_delay_s + the replica's graceful stop."""
POLL_S = 0.25


def replica_timeline(path: Path) -> list[dict[str, Any]]:
    """The Generator's states so far: {"t": monotonic s, "status", "replicas": {state: count}} (or "error")."""
    if not path.exists():
        return []
    # Only whole lines: the server may be writing the next one.
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def running(entry: dict[str, Any]) -> int:
    return entry.get("replicas", {}).get("RUNNING", 0)


def settled(entry: dict[str, Any], replicas: int) -> bool:
    """`replicas` running and none starting or stopping."""
    return entry.get("replicas") == {"RUNNING": replicas}


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(POLL_S)
    return condition()


def describe(timeline: list[dict[str, Any]], origin: float) -> str:
    return "\n".join(f"  {entry['t'] - origin:+7.1f} s  {entry.get('status', '')} {entry.get('replicas', entry)}"
                     for entry in timeline)


async def run_load(url: str, replica_log: Path) -> dict[str, Any]:
    """CLIENTS clients send requests back to back until the Generator has 2 running replicas (or UPSCALE_S passed)
    and HOLD_S more; then all but one stop, and that one goes on until the Generator is back to 1 replica (or
    DOWNSCALE_S passed), so requests are also in flight while a replica is removed. Returns each request as
    (sent, answered, status or error) and the monotonic times the load started, first saw 2 running replicas,
    dropped to one client and saw 1 replica again (None where that never came)."""
    heavy_stop, all_stop = asyncio.Event(), asyncio.Event()
    results: list[tuple[float, float, int | str]] = []

    async def client(http: httpx.AsyncClient, i: int) -> None:
        while not (all_stop if i == 0 else heavy_stop).is_set():
            sent = time.monotonic()
            try:
                response = await http.post("/v1/completions", json={
                    "model": MODEL, "prompt": f"a cat on a sofa, number {i}", "max_tokens": MAX_TOKENS,
                    "temperature": 1.0})
                outcome: int | str = response.status_code
            except Exception as error:  # any failure is an outcome the test reports, not a crash
                outcome = f"{type(error).__name__}: {error}"
            results.append((sent, time.monotonic(), outcome))

    def seen(replicas: int, since: float) -> bool:
        return any(e["t"] >= since and (running(e) == 2 if replicas == 2 else settled(e, replicas))
                   for e in replica_timeline(replica_log))

    times: dict[str, Any] = {"upscaled": None, "downscaled": None}
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S,
                                 limits=httpx.Limits(max_connections=CLIENTS)) as http:
        times["started"] = time.monotonic()
        tasks = [asyncio.create_task(client(http, i)) for i in range(CLIENTS)]
        try:
            if await wait_until(lambda: seen(2, times["started"]), UPSCALE_S):
                times["upscaled"] = time.monotonic()
                await asyncio.sleep(HOLD_S)  # a load of known length on two replicas, not a wait for a condition
            heavy_stop.set()
            times["stopped"] = time.monotonic()
            if times["upscaled"] and await wait_until(lambda: seen(1, times["stopped"]), DOWNSCALE_S):
                times["downscaled"] = time.monotonic()
        finally:
            heavy_stop.set()
            times.setdefault("stopped", time.monotonic())
            all_stop.set()
            # Each client ends after its request in flight, which its timeout bounds.
            await asyncio.wait_for(asyncio.gather(*tasks), CLIENT_TIMEOUT_S + 15)
    return {"results": results, **times}


@pytest.mark.timeout(540)  # a backstop only: the deadlines above end the test well before
def test_generator_scales_up_under_load_and_back_down_after_it(tmp_path, tiny_models_cfg):
    replica_log = tmp_path / "replicas.jsonl"
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("serve_replica_log.py")), str(replica_log),
            "--preset", "tiny"]
    for item in [f"serve.port={port}", *(f"serve.{key}={value}" for key, value in SERVE.items()),
                 f"models.zoo_dir={tiny_models_cfg.zoo_dir}", f"output_dir={tmp_path / 'run'}"]:
        argv += ["--set", item]
    server: ServeProcess = start(argv, tmp_path / "serve.log", f"http://127.0.0.1:{port}",
                                 ready_line="bp-ray serve: ready", timeout_s=START_S)
    try:
        assert asyncio.run(wait_until(lambda: any(settled(e, 1) for e in replica_timeline(replica_log)), 30)), (
            replica_timeline(replica_log), server.log_tail())

        run = asyncio.run(run_load(server.url, replica_log))
        started, stopped, results = run["started"], run["stopped"], run["results"]
        timeline = replica_timeline(replica_log)
        report = (f"{CLIENTS} clients from +0.0 s to {stopped - started:+.1f} s, then 1 client; Generator "
                  f"replicas (times from the load's start):\n{describe(timeline, started)}")
        outcomes = Counter(outcome for _, _, outcome in results)
        report += (f"\nrequests: {dict(outcomes)}, {sum(sent >= stopped for sent, _, _ in results)} of them sent by "
                   f"the one client; slowest {max((end - sent for sent, end, _ in results), default=0):.1f} s")
        print(report)

        assert set(outcomes) <= {200, 503}, (report, server.log_tail())
        assert outcomes[200] >= CLIENTS, report  # the load was served, not refused
        before = [e for e in timeline if e["t"] < started]
        assert before and settled(before[-1], 1), report  # one replica when the load began
        assert run["upscaled"] is not None, (
            f"no second replica within {UPSCALE_S:g} s of load\n{report}\n{server.log_tail()}")
        first_two = min(e["t"] for e in timeline if e["t"] >= started and running(e) == 2)
        assert all(running(e) == 2 for e in timeline if first_two <= e["t"] < stopped), (
            f"a replica went while the load lasted\n{report}")
        assert run["downscaled"] is not None, (
            f"not back to one replica within {DOWNSCALE_S:g} s of the load's end\n{report}")
    finally:
        server.stop(timeout_s=60)
