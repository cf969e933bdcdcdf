"""Pair sources (ii) and (iii): an LLM summarises high-quality prompts and expands low-quality ones.

The LLM is a local Hugging Face causal LM (models.rewriter) or any OpenAI-compatible endpoint; the instruction
templates come from the config (`{prompt}` marks where the prompt goes).
"""

from __future__ import annotations

import numpy as np
import torch

from bp_ray.config import DataConfig, ModelsConfig
from bp_ray.data import columns as C
from bp_ray.data.pairs import llm_rows
from bp_ray.data.prompt_rules import answer_text


def build_instructions(template: str, prompts: list[str]) -> list[str]:
    # str.replace, not str.format: user prompts may contain braces.
    return [template.replace("{prompt}", prompt) for prompt in prompts]


@torch.no_grad()
def generate_local(model, tokenizer, instructions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each instruction (deterministic per row): its first line, without a lead-in such as
    "The image prompt is:" (prompt_rules.answer_text)."""
    if not instructions:
        return []
    if getattr(tokenizer, "chat_template", None):
        # Instruct models answer reliably only inside their own chat format.
        instructions = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True) for text in instructions]
    encoded = tokenizer(instructions, return_tensors="pt", padding=True, truncation=True,
                        max_length=min(tokenizer.model_max_length, 512)).to(model.device)
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, encoded["input_ids"].shape[1]:]
    return [answer_text(text) for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


class PromptRewriter:
    """Ray Data UDF: one LLM per actor; writes `summary` for high rows and `expansion` for low rows."""

    def __init__(self, data_cfg: DataConfig, models_cfg: ModelsConfig):
        self.cfg = data_cfg
        if data_cfg.llm_backend == "openai":
            from bp_ray.data.openai_backend import OpenAIRewriter, OpenAISettings

            self.remote = OpenAIRewriter(OpenAISettings.from_config(data_cfg))
        else:
            from bp_ray.models.loading import load_causal_lm

            self.remote = None
            self.model, self.tokenizer = load_causal_lm(models_cfg.rewriter, models_cfg, device=models_cfg.device)

    def _complete(self, instructions: list[str]) -> tuple[list[str], list[str]]:
        """(texts, errors); a failed item has text "" and a short error."""
        if self.remote is None:
            texts = generate_local(self.model, self.tokenizer, instructions, self.cfg.max_new_tokens)
            return texts, [""] * len(texts)
        results = self.remote.complete(instructions)
        return [r.text or "" for r in results], [r.error or "" for r in results]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = len(batch[C.QUALITY])
        batch[C.SUMMARY] = np.full(size, "", dtype=object)
        batch[C.EXPANSION] = np.full(size, "", dtype=object)
        batch[C.GEN_ERROR] = np.full(size, "", dtype=object)
        jobs = []
        if self.cfg.use_summaries:
            jobs.append((C.SUMMARY, "high", self.cfg.summarise_template))
        if self.cfg.use_expansions:
            jobs.append((C.EXPANSION, "low", self.cfg.expand_template))
        chosen = llm_rows(batch[C.ROW_ID].tolist(), self.cfg.llm_fraction)
        for column, quality, template in jobs:
            rows = np.flatnonzero((batch[C.QUALITY] == quality) & chosen)
            texts, errors = self._complete(build_instructions(template, [str(batch[C.PROMPT][i]) for i in rows]))
            for i, text, error in zip(rows, texts, errors, strict=True):
                batch[column][i] = text
                batch[C.GEN_ERROR][i] = error
        return batch
