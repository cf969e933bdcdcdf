"""Best-of-n on the beautifier endpoint (2 CPU cores, tiny zoo): requests/s of `n=4, rank=reward_model,
best_of=1` (four rewrites generated, scored by the learned reward models and the best returned) against plain
`n=4` (four rewrites returned), both at 8 closed-loop clients over loopback HTTP, on one deployment, alternating
the two modes --repeats times; the median ratio with its range.

Every request of a level is batched: the four rows ride the generator's batches, and the ranked requests' texts
ride one scorer call per batch (the ingress batches scoring like generation). The reward models are those of
--rm (a `bp-ray train rm` folder), else an untrained folder of the tiny zoo's backbone built here: ranking costs
the same whatever the weights.

    python benchmarks/serve_controls.py [--rm runs/world/rm] [--repeats 3] [--requests-per-client 6]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from machine import facts, print_results, summary
from serve_load import PORT, closed_loop, cpu_by_role, cpu_per_request, serve_config

from bp_ray.embedded.tiny_zoo import ensure_tiny_zoo
from bp_ray.models.loading import resolve_model

MODES = {"plain n=4": {"n": 4}, "best of 4 (reward model)": {"n": 4, "rank": "reward_model", "best_of": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rm", default=None, help="reward-model folder (default: an untrained tiny one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    import ray
    from ray import serve

    from bp_ray.ray_runtime import init_ray
    from bp_ray.serve.app import build_app

    work = Path(tempfile.mkdtemp(prefix="bp-ray-controls-bench-"))
    cfg = serve_config(True, 32)
    ensure_tiny_zoo(cfg.models)
    rm_dir = args.rm
    if rm_dir is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.integration.rm_folder import untrained_rm_folder

        rm_dir = str(untrained_rm_folder(cfg.models, work / "rm"))
    cfg.serve.controls.reward_model = rm_dir
    cfg.output_dir = str(work / "run")
    threads = {"generator_replica": max(1, int(cfg.serve.num_cpus_per_replica))}
    machine = facts(**threads)
    init_ray(cfg.cluster)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    try:
        serve.run(build_app(cfg, resolve_model(cfg.models.policy, cfg.models)), name="controls", route_prefix="/")
        url = f"http://127.0.0.1:{PORT}"
        for extra in MODES.values():  # warm-up: both paths once
            asyncio.run(closed_loop(url, 2, 2, args.max_new_tokens, extra=extra))
        for repeat in range(args.repeats):
            for mode, extra in MODES.items():
                before = cpu_by_role()
                row = asyncio.run(closed_loop(url, args.clients, args.requests_per_client, args.max_new_tokens,
                                              extra=extra))
                row["cpu_ms_per_request"] = cpu_per_request(before, cpu_by_role(), row["requests"])
                runs[mode].append(row)
                print(f"repeat {repeat + 1}: {mode:26s} {row['rps']:6.1f} req/s, p50 {row['p50_ms']:.0f} ms, "
                      f"p99 {row['p99_ms']:.0f} ms; CPU ms per request {row['cpu_ms_per_request']}", flush=True)
        serve.delete("controls")
    finally:
        serve.shutdown()
        ray.shutdown()
    plain, ranked = (runs[mode] for mode in MODES)
    print_results({"machine": machine, "clients": args.clients, "max_new_tokens": args.max_new_tokens,
                   "plain_n4_rps": summary([r["rps"] for r in plain]),
                   "best_of_4_rm_rps": summary([r["rps"] for r in ranked]),
                   "best_of_4_rm_over_plain_n4": summary([b["rps"] / a["rps"] for a, b in zip(plain, ranked,
                                                                                              strict=True)])})


if __name__ == "__main__":
    main()
