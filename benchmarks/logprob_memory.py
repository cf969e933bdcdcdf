"""Peak memory of PPO's log-probs over BLOOM's 250,880-token vocabulary: full float32 logits against the chunked
LM head (bp_ray/train/token_logprobs.py), side by side in one run.

Each variant runs in a fresh process (so one's peak cannot hide in the other's) on the same random BLOOM at the real
width (1536) and vocabulary with 2 layers: a forward with grad over B responses of R tokens, log-probs and entropy
of the response tokens, and the backward. Printed: the process's peak resident memory above what it held after
loading the model and building the batch, and the time of forward + backward.

    python benchmarks/logprob_memory.py [--batch 8] [--response 64] [--layers 2]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from fresh_process import in_fresh_process, peak_rss

GIB = 1024 ** 3


def _measure(variant: str, batch: int, response: int, layers: int, query: int, out: Any) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    from bp_ray.train.ppo_math import entropy_from_logits, logprobs_from_logits
    from bp_ray.train.token_logprobs import final_hidden_states, token_logprobs

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = BloomForCausalLM(BloomConfig(vocab_size=250_880, hidden_size=1536, n_layer=layers, n_head=16))
    ids = torch.randint(0, 250_880, (batch, query + response))
    mask = torch.ones_like(ids)
    targets = ids[:, query:]
    before = peak_rss()  # ru_maxrss only grows: what the model and batch took so far
    started = time.perf_counter()
    if variant == "full":
        logits = model(input_ids=ids, attention_mask=mask).logits[:, query - 1:-1].float()
        logprobs, entropy = logprobs_from_logits(logits, targets), entropy_from_logits(logits)
    else:
        hidden = final_hidden_states(model, ids, mask)[:, query - 1:-1]
        logprobs, entropy = token_logprobs(hidden, model.get_output_embeddings(), targets, with_entropy=True)
    (logprobs.sum() + entropy.sum()).backward()
    out.put({"variant": variant, "peak_above_model_bytes": peak_rss() - before,
             "seconds": time.perf_counter() - started, "logprob_sum": float(logprobs.detach().sum())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--query", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    full_logits = args.batch * args.response * 250_880 * 4
    print(f"BLOOM width 1536, vocabulary 250,880, {args.layers} layers; {args.batch} responses of {args.response} "
          f"tokens after {args.query} query tokens (their float32 logits alone: {full_logits / GIB:.2f} GiB)")
    results = [in_fresh_process(_measure, v, args.batch, args.response, args.layers, args.query)
               for v in ("full", "chunked")]
    for r in results:
        print(f"  {r['variant']:<8} peak above the model {r['peak_above_model_bytes'] / GIB:6.2f} GiB   "
              f"forward + backward {r['seconds']:6.2f} s   sum of log-probs {r['logprob_sum']:.3f}")
    full, chunked = results
    print(f"chunked / full: peak memory {chunked['peak_above_model_bytes'] / full['peak_above_model_bytes']:.2f}×, "
          f"time {chunked['seconds'] / full['seconds']:.2f}×")


if __name__ == "__main__":
    main()
