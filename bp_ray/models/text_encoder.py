"""A sentence encoder: how close two texts are in meaning, by a real pretrained model rather than word overlap.

It judges a rewrite's content against the user's prompt: eval-text's `content_similarity` and the text reward's
relevance term (`ppo.relevance_model: text_encoder`). The embedding is the mean of the last hidden states over the
text's tokens, L2-normalised, as sentence-transformers computes it for all-MiniLM-L6-v2 (its `1_Pooling` and
`2_Normalize` modules).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MAX_TOKENS = 256
"""all-MiniLM-L6-v2's `max_seq_length`: it was trained on at most 256 word pieces."""


class TextEncoder:
    """Mean-pooled, normalised sentence embeddings of a Hugging Face encoder.

        encoder = load_text_encoder("pkg:all-minilm-l6-v2")
        encoder.similarity(["a cat on a sofa"], ["a tabby cat asleep on a velvet couch, soft light"])  # ~0.7
    """

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu", batch_size: int = 64):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-length embeddings."""
        parts = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            parts.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(parts) if parts else torch.zeros(0, self.model.config.hidden_size)

    def similarity(self, texts: Sequence[str], others: Sequence[str]) -> np.ndarray:
        """(N,) cosine similarity of texts[i] and others[i]."""
        if len(texts) != len(others):
            raise ValueError(f"{len(texts)} texts but {len(others)} to compare them with")
        if not texts:
            return np.zeros(0)
        return (self.embed(texts) * self.embed(others)).sum(dim=-1).cpu().numpy().astype(np.float64)
