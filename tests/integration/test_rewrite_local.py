"""Local LLM backend of the data stage on the tiny BLOOM: batched greedy rewrites, chat format when present."""

from __future__ import annotations

import pytest
import torch

from bp_ray.data.rewrite import build_instructions, generate_local
from bp_ray.models.loading import load_causal_lm

pytestmark = pytest.mark.integration


def test_one_deterministic_rewrite_per_instruction(tiny_models_cfg):
    model, tokenizer = load_causal_lm("tiny:bloom", tiny_models_cfg)
    instructions = build_instructions("Describe {prompt} in detail:", ["a cat", "an old {weird} lighthouse"])
    assert instructions[1] == "Describe an old {weird} lighthouse in detail:"  # braces in prompts are safe
    first = generate_local(model, tokenizer, instructions, max_new_tokens=6)
    assert len(first) == 2 and first == generate_local(model, tokenizer, instructions, max_new_tokens=6)
    assert all("\n" not in text for text in first)
    assert generate_local(model, tokenizer, [], max_new_tokens=6) == []


def test_instruct_models_get_their_chat_format(tiny_models_cfg):
    model, tokenizer = load_causal_lm("tiny:bloom", tiny_models_cfg)
    tokenizer.chat_template = "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}assistant:"
    wrapped = "user: expand a cat\nassistant:"
    encoded = tokenizer([wrapped], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**encoded, max_new_tokens=5, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[:, encoded["input_ids"].shape[1]:]
    expected_text = tokenizer.batch_decode(expected, skip_special_tokens=True)[0].strip().split("\n")[0].strip()
    assert generate_local(model, tokenizer, ["expand a cat"], max_new_tokens=5) == [expected_text]
