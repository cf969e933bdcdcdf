"""Pretraining of the tiny causal LM on prompt text, so the policy starts out writing prompt-like text.

The real BLOOM arrives knowing language; the random tiny one knows nothing, and SFT alone has too few pairs to
teach it the words. A short next-token run on world descriptions and corpus prompts stands in for pretraining.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bp_ray.embedded.config import WorldConfig
from bp_ray.embedded.world.scenes import parse_description


def _batch(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    # Right padding for training (left padding is for generation); EOS ends every text so the model learns to stop.
    encoded = [[*tokenizer(t, add_special_tokens=False)["input_ids"][: max_length - 1], tokenizer.eos_token_id]
               for t in texts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def lm_loss(model, tokenizer, texts: list[str], max_length: int = 64, batch_size: int = 64) -> float:
    """Mean next-token loss over texts (per batch, then averaged)."""
    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            losses.append(float(model(**_batch(tokenizer, texts[start:start + batch_size], max_length)).loss))
    return float(np.mean(losses))


def train_world_lm(folder: Path, texts: list[str], world: WorldConfig, heldout: list[str] | None = None,
                   max_length: int = 64) -> dict[str, float]:
    """Train the causal LM saved in `folder` on `texts` for world.lm_steps steps and save it back in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(world.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    heldout = heldout or texts[:256]
    stats = {"steps": world.lm_steps, "heldout_loss_before": lm_loss(model, tokenizer, heldout, max_length)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=world.lm_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=world.lm_lr,
                                                   total_steps=max(world.lm_steps, 1), pct_start=0.1)
    order = np.random.default_rng(world.seed).permutation(len(texts))
    start = time.perf_counter()
    model.train()
    for step in range(world.lm_steps):
        rows = order[(step * world.lm_batch_size + np.arange(world.lm_batch_size)) % len(texts)]
        loss = model(**_batch(tokenizer, [texts[i] for i in rows], max_length)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            stats["train_loss_first"] = loss.item()
    stats["seconds"] = time.perf_counter() - start
    stats["train_loss_last"] = loss.item() if world.lm_steps else float("nan")
    stats["heldout_loss_after"] = lm_loss(model, tokenizer, heldout, max_length)
    model.eval()
    model.save_pretrained(folder)
    return stats


def sample_world_share(model, tokenizer, num: int = 32, seed: int = 0, max_new_tokens: int = 32) -> float:
    """Share of free samples, started from the word "a", that describe at least one coloured world shape."""
    torch.manual_seed(seed)
    start = torch.tensor([tokenizer("a", add_special_tokens=False)["input_ids"]] * num, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=20,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return float(np.mean([bool(parse_description(t).objects) for t in texts]))
