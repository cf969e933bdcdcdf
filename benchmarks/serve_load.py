"""Load on the beautifier endpoint on this machine: requests/s and p50/p99 latency at 1, 8, 32 and 64 concurrent
clients, for (a) the batched deployment, (b) the same deployment with batching off (max_batch_size 1) and (c) the
model's own `generate` on the same batch sizes in this process, with no HTTP and no Serve (the limit here).

Each client is a closed loop (send, wait for the answer, send again) over loopback HTTP; every level sends a
bounded number of requests. Requests are `POST /v1/beautify` with the training template, `max_new_tokens` new
tokens at temperature 0.7, top-p 0.9, a distinct seed each. The served model is the tiny zoo's policy (random
weights, so every output runs to the token limit, the worst case); one replica with serve.num_cpus_per_replica
(1 torch thread), the same thread count as the in-process limit. Backpressure is off here (no 503s): this
measures throughput, not admission.

Then streaming: 32 closed-loop clients on `/v1/chat/completions` with `stream: true` (reading every event to
`[DONE]`) against the same requests without streaming, on the batched deployment.

Everything is measured --repeats times (one deployment per repeat and mode; batching off once, as the reference)
and the figures are reported as the median of the repeats with their range: batched / limit at 32 clients, p99 at
64 clients / p99 at 8, streamed / plain at 32.

Each level also prints where the machine's CPU went, per request answered: the HTTP proxy, the ingress replica,
the generator replica, Ray's own daemons (raylet, GCS, Serve controller), this process (the clients) and the rest
of the machine (read from /proc for every process, so it is the whole machine's time, not a sample).

    python benchmarks/serve_load.py [--requests-per-client 6] [--max-new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence

import httpx
import numpy as np
import torch
from machine import facts, print_results, refuse_mismatch, summary

from bp_ray.config import PipelineConfig
from bp_ray.config_loader import load_config
from bp_ray.models.loading import load_causal_lm, resolve_model
from bp_ray.serve.generation import beautify_input

CONCURRENCY = (1, 8, 32, 64)
PROMPTS = ("a cat on a sofa", "a red car in the rain", "a lighthouse at night", "portrait of an old sailor",
           "a castle on a hill", "a bowl of fruit", "a dragon over the city", "a forest in autumn")
PORT = 8123


def serve_config(batched: bool, max_batch_size: int) -> PipelineConfig:
    return load_config("tiny", [
        "serve.min_replicas=1", "serve.max_replicas=1", "serve.max_concurrent_batches=1", "serve.enable_render=false",
        f"serve.max_batch_size={max_batch_size if batched else 1}",
        "serve.max_ongoing_requests=128", "serve.max_queued_requests=-1", "serve.request_timeout_s=300",
        f"serve.port={PORT}", "serve.max_new_tokens=256"])


ROLES = (("proxy", "ProxyActor"), ("ingress", ":Beautifier"), ("generator", ":Generator"), ("scorer", ":Scorer"),
         ("ray daemons", "raylet"), ("ray daemons", "gcs_server"), ("ray daemons", "ServeController"))


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system) so far of every process on the machine, summed by its role in the endpoint."""
    import os

    import psutil

    totals = dict.fromkeys([role for role, _ in ROLES] + ["clients", "rest of machine"], 0.0)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        command = " ".join(proc.info["cmdline"] or [])
        role = "clients" if proc.pid == os.getpid() else next(
            (role for role, mark in ROLES if mark in command), "rest of machine")
        totals[role] += times.user + times.system
    return totals


def cpu_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Milliseconds of CPU per request answered, by role, between two `cpu_by_role` readings."""
    return {role: round((after[role] - before.get(role, 0.0)) * 1000 / requests, 2) for role in after}


def percentiles(latencies: Sequence[float]) -> tuple[float, float]:
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


async def closed_loop(url: str, clients: int, per_client: int, max_new_tokens: int,
                      route: str = "beautify", extra: dict | None = None) -> dict[str, float]:
    """`clients` concurrent loops of `per_client` requests each; requests/s over the whole level. `extra`: more
    fields of every beautify request.

    aiohttp (installed with Ray), not httpx: at 64 concurrent requests httpx's async client was measured here to
    spend ~8 ms of CPU per request against ~0.3 ms for aiohttp, which on 2 cores would starve the server."""
    import aiohttp

    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        async def loop(client: int) -> None:
            for i in range(per_client):
                seed = client * 1000 + i
                prompt = PROMPTS[seed % len(PROMPTS)]
                if route == "beautify":
                    path = "/v1/beautify"
                    body = {"prompt": prompt, "seed": seed, "max_new_tokens": max_new_tokens, "temperature": 0.7,
                            **(extra or {})}
                else:  # chat, streamed or not
                    path = "/v1/chat/completions"
                    body = {"model": "bp-ray-beautifier", "messages": [{"role": "user", "content": prompt}],
                            "seed": seed, "max_tokens": max_new_tokens, "temperature": 0.7,
                            "stream": route == "chat-stream"}
                start = time.perf_counter()
                async with http.post(path, json=body) as response:
                    response.raise_for_status()
                    payload = await response.read()
                if route == "chat-stream" and not payload.rstrip().endswith(b"data: [DONE]"):
                    raise RuntimeError(f"a stream ended without [DONE]: {payload[-200:]!r}")
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in range(clients)))
        wall = time.perf_counter() - start
    p50, p99 = percentiles(latencies)
    return {"rps": len(latencies) / wall, "p50_ms": p50 * 1000, "p99_ms": p99 * 1000, "requests": len(latencies)}


def measure_endpoint(cfg: PipelineConfig, name: str, per_client: dict[int, int],
                     max_new_tokens: int, streaming_at: int = 0) -> dict:
    from ray import serve

    from bp_ray.serve.app import build_app

    serve.run(build_app(cfg, resolve_model(cfg.models.policy, cfg.models)), name=name, route_prefix="/")
    url = f"http://127.0.0.1:{PORT}"
    asyncio.run(closed_loop(url, 8, 2, max_new_tokens))  # warm-up
    results = {}
    for clients in CONCURRENCY:
        before = httpx.get(url + "/healthz").json()["generator"]["batching"]
        cpu_before = cpu_by_role()
        results[clients] = row = asyncio.run(closed_loop(url, clients, per_client[clients], max_new_tokens))
        row["cpu_ms_per_request"] = cpu_per_request(cpu_before, cpu_by_role(), row["requests"])
        after = httpx.get(url + "/healthz").json()["generator"]["batching"]
        batches = after["batches"] - before["batches"]
        row["mean_batch_rows"] = (after["rows"] - before["rows"]) / max(1, batches)
        row["generate_share"] = (after["generate_s"] - before["generate_s"]) / (row["requests"] / row["rps"])
        print(f"  {name:10s} {clients:3d} clients: {row['rps']:7.1f} req/s, p50 {row['p50_ms']:.0f} ms "
              f"({row['requests']} requests, {row['mean_batch_rows']:.1f} rows per batch, generate busy "
              f"{row['generate_share']:.0%} of the time)", flush=True)
        print_cpu(row)
    if streaming_at:
        for route in ("chat", "chat-stream"):
            cpu_before = cpu_by_role()
            row = asyncio.run(closed_loop(url, streaming_at, per_client[streaming_at], max_new_tokens, route))
            row["cpu_ms_per_request"] = cpu_per_request(cpu_before, cpu_by_role(), row["requests"])
            results[route] = row
            print(f"  {name:10s} {streaming_at:3d} clients, {route}: {row['rps']:7.1f} req/s, "
                  f"p50 {row['p50_ms']:.0f} ms", flush=True)
            print_cpu(row)
    serve.delete(name)
    return results


def print_cpu(row: dict) -> None:
    cpu = row["cpu_ms_per_request"]
    print("             CPU ms per request: " + ", ".join(f"{role} {ms:.2f}" for role, ms in cpu.items())
          + f"; total {sum(cpu.values()):.2f}", flush=True)


@torch.no_grad()
def measure_limit(cfg: PipelineConfig, max_new_tokens: int, repeats: int = 3) -> dict[int, dict]:
    """`generate` on batches of the same templated prompts, one torch thread, no HTTP: prompts/s."""
    torch.set_num_threads(max(1, int(cfg.serve.num_cpus_per_replica)))
    model, tokenizer = load_causal_lm(cfg.models.policy, cfg.models, device="cpu")
    results = {}
    for batch in CONCURRENCY:
        texts = [beautify_input(cfg.sft.instruction, PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.generate(**encoded, do_sample=True, temperature=0.7, top_p=0.9, top_k=0,
                           max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times[1:])
        results[batch] = {"rps": batch / seconds, "p50_ms": seconds * 1000, "p99_ms": seconds * 1000,
                          "requests": batch * repeats}
        print(f"  limit      batch {batch:3d}: {results[batch]['rps']:7.1f} prompts/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--min-requests", type=int, default=48, help="at least this many requests per level")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every measurement as JSON")
    args = parser.parse_args()

    import ray
    from ray import serve

    from bp_ray.ray_runtime import init_ray

    batched_cfg = serve_config(True, max(CONCURRENCY))
    threads = {"generator_replica": max(1, int(batched_cfg.serve.num_cpus_per_replica)),
               "in_process_limit": max(1, int(batched_cfg.serve.num_cpus_per_replica))}
    refuse_mismatch(**threads)
    machine = facts(**threads)
    init_ray(batched_cfg.cluster)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    per_client = {c: max(args.requests_per_client, -(-args.min_requests // c)) for c in CONCURRENCY}
    repeats: list[dict] = []
    try:
        unbatched = measure_endpoint(serve_config(False, 1), "unbatched", per_client, args.max_new_tokens)
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1} of {args.repeats}", flush=True)
            batched = measure_endpoint(batched_cfg, "batched", per_client, args.max_new_tokens, streaming_at=32)
            repeats.append({"batched": batched, "limit": measure_limit(batched_cfg, args.max_new_tokens)})
    finally:
        serve.shutdown()
        ray.shutdown()

    def median(name: str, c: int, key: str) -> float:
        return statistics.median(r[name][c][key] for r in repeats)

    print(f"\nbeautify, {args.max_new_tokens} new tokens, 1 replica, {machine['cores']} cores; medians of "
          f"{len(repeats)} repeats (requests/s; p50 / p99 latency in ms); batching off measured once")
    print("| clients | batched req/s | p50 / p99 | unbatched req/s | p50 / p99 | in-process limit req/s "
          "| batched / unbatched | batched / limit |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in CONCURRENCY:
        u = unbatched[c]
        b_rps, limit_rps = median("batched", c, "rps"), median("limit", c, "rps")
        print(f"| {c} | {b_rps:.1f} | {median('batched', c, 'p50_ms'):.0f} / {median('batched', c, 'p99_ms'):.0f} | "
              f"{u['rps']:.1f} | {u['p50_ms']:.0f} / {u['p99_ms']:.0f} | {limit_rps:.1f} | {b_rps / u['rps']:.2f}x | "
              f"{b_rps / limit_rps:.2f}x |")
    figures = {
        "machine": machine,
        "batched_over_limit_at_32": summary([r["batched"][32]["rps"] / r["limit"][32]["rps"] for r in repeats]),
        "p99_64_over_p99_8": summary([r["batched"][64]["p99_ms"] / r["batched"][8]["p99_ms"] for r in repeats]),
        "streamed_over_plain_chat_at_32": summary([r["batched"]["chat-stream"]["rps"] / r["batched"]["chat"]["rps"]
                                                   for r in repeats]),
    }
    print_results(figures)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"unbatched": unbatched, "repeats": repeats, **figures}, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
