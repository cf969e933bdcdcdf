"""One optimizer step of the tiny BLOOM on a CPU (8 sequences x 84 tokens, one thread): plain torch AdamW against the
DeepSpeed engine bp-ray's training uses, side by side in one process; what the engine costs a tiny model's update
(issue 21: the update is 68% of a GRPO iteration).

    python benchmarks/ds_step_overhead.py [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def timed_ms(step, steps: int) -> float:
    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    from bp_ray.config_loader import load_config
    from bp_ray.models.loading import load_causal_lm
    from bp_ray.train.deepspeed_config import deepspeed_config
    from bp_ray.train.loop import prepare_cpu_deepspeed

    cfg = load_config("tiny")
    torch.set_num_threads(1)
    ids = torch.randint(5, 500, (8, 84))
    mask = torch.ones_like(ids)

    plain_model, _ = load_causal_lm(cfg.models.policy, cfg.models, device="cpu")
    plain_model.train()
    optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-4)

    def plain() -> None:
        plain_model(input_ids=ids, attention_mask=mask).logits.float().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    prepare_cpu_deepspeed()
    engine_model, _ = load_causal_lm(cfg.models.policy, cfg.models, device="cpu")
    engine_model.train()
    config = deepspeed_config(cfg.ppo.deepspeed, 8, 1, 1e-4, 0.0, 0, 1000, "constant", on_cpu=True)
    engine, *_ = deepspeed.initialize(model=engine_model, model_parameters=engine_model.parameters(), config=config)

    def with_engine() -> None:
        engine.backward(engine(input_ids=ids, attention_mask=mask).logits.float().mean())
        engine.step()

    plain_ms, engine_ms = timed_ms(plain, args.steps), timed_ms(with_engine, args.steps)
    print(f"plain torch AdamW step {plain_ms:.1f} ms, DeepSpeed engine step {engine_ms:.1f} ms, "
          f"ratio {engine_ms / plain_ms:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
