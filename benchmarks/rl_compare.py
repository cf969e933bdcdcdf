"""PPO, GRPO and RLOO in the miniature world: the same SFT policy, pairs, reward and number of sampled responses,
several seeds of each whole RL run, judged by the world's ground truth (issue 21).

    python benchmarks/rl_compare.py --run runs/world                      # 3 seeds x ppo, grpo, rloo
    python benchmarks/rl_compare.py --run runs/world --seeds 1 --algorithms grpo --set ppo.group_size=8

`--run` is a finished world run (its data, rewards cache and SFT model are reused; nothing in it is changed). Each
(algorithm, seed) trains into OUT/<algorithm>-s<seed>/ppo and is evaluated there (96 held-out requests x 2 render
seeds, the world preset's eval). Prints one row per algorithm: true aesthetic, colour / shape / count match, CLIP
relevance (each the mean over seeds of the run's mean, with a 95% t-interval over the seeds), the final KL to the
reference, RL wall time, sampled responses per second, and the peak RSS of the Ray Train worker and of the
reference, reward and (async_rollout) rollout actors (sampled every 0.5 s); `--json FILE` writes every run's row.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

METRICS = ("true_aesthetic", "colour_match", "shape_match", "count_match", "relevance")
PROCESSES = {"worker": "RayTrainWorker", "reference": "ReferencePolicy", "reward": "RewardService",
             "rollout": "RolloutSampler"}


class PeakRSS:
    """Peak resident memory of this machine's Ray processes, by role (matched on the process title)."""

    def __init__(self) -> None:
        self.peak = dict.fromkeys(PROCESSES, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            for process in psutil.process_iter(["cmdline", "memory_info"]):
                title = " ".join(process.info["cmdline"] or [])
                for role, marker in PROCESSES.items():
                    if marker in title and process.info["memory_info"] is not None:
                        self.peak[role] = max(self.peak[role], process.info["memory_info"].rss)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_run(run: Path, out: Path, algorithm: str, seed: int, overrides: list[str]) -> dict:
    from bp_ray.config_loader import load_config
    from bp_ray.eval.run import run_evaluation
    from bp_ray.rewards.labeler import RewardSetup
    from bp_ray.rewards.pipeline import reward_cache_path
    from bp_ray.train.ppo import run_ppo

    cfg = load_config("world", [f"ppo.algorithm={algorithm}", f"ppo.seed={seed}", *overrides])
    began = time.perf_counter()
    with PeakRSS() as memory:
        manifest = run_ppo(cfg.ppo, cfg.sft, cfg.cluster, RewardSetup.for_labels(cfg.data, cfg.rewards, cfg.models),
                           cfg.data.scorer_pool, run / "data", run / "sft", run / "rm", out / "ppo",
                           cache_path=reward_cache_path(cfg.rewards, run / "rewards"))
    rl_s = time.perf_counter() - began
    run_evaluation(cfg.eval, cfg.sft, cfg.data, cfg.rewards, cfg.models, cfg.cluster, out / "eval",
                   systems=["original", "ppo"], ppo_dir=out / "ppo")
    table = {row["system"]: row for row in json.loads((out / "eval" / "results.json").read_text())["table"]}
    samples = cfg.ppo.rollout_batch_size * manifest["steps"]
    return {"algorithm": algorithm, "seed": seed, **{m: table["ppo"][f"{m}_mean"] for m in METRICS},
            "original": {m: table["original"][f"{m}_mean"] for m in METRICS},
            "kl": manifest["final_metrics"]["kl"], "rl_s": rl_s, "samples": samples, "samples_per_s": samples / rl_s,
            **{f"rss_{role}_mb": peak / 2**20 for role, peak in memory.peak.items()}}


def interval(values: list[float]) -> str:
    """mean ± the 95% t-interval half-width over the seeds."""
    from scipy import stats

    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.3f}"
    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
    return f"{mean:.3f} ± {half:.3f}"


def print_table(rows: list[dict]) -> None:
    columns = [*METRICS, "kl", "rl_s", "samples_per_s", "rss_worker_mb", "rss_reference_mb", "rss_reward_mb",
               "rss_rollout_mb"]
    print("| algorithm | seeds | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        mine = [r for r in rows if r["algorithm"] == algorithm]
        print(f"| {algorithm} | {len(mine)} | " + " | ".join(interval([r[c] for r in mine]) for c in columns) + " |")
    original = rows[0]["original"]
    print("| original (the user's prompts) | | " + " | ".join(f"{original[m]:.3f}" for m in METRICS) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished world run (data, rewards, sft, rm)")
    parser.add_argument("--out", type=Path, default=Path("runs/rl_compare"))
    parser.add_argument("--algorithms", default="ppo,grpo,rloo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        for algorithm in args.algorithms.split(","):
            row = one_run(args.run.resolve(), (args.out / f"{algorithm}-s{seed}").resolve(), algorithm, seed,
                          args.set)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
