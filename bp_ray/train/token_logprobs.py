"""Log-probs of chosen tokens under a causal LM without ever holding its (B, positions, vocab) float32 logits.

BLOOM's vocabulary has 250,880 tokens: the float32 logits of B = 16 responses of R = 256 tokens (one worker's
share of the paper's rollout) are B x R x V x 4 bytes = 4.1 GB, and their softmax and gradient as much again.
Here the LM head runs on a few positions at a time (`chunk`: by default as many as keep one chunk's float32
logits under CHUNK_BYTES), and each chunk gives the chosen token's log-prob (its logit minus the logsumexp, in
float32) and, if asked, the entropy. With grad, every chunk is checkpointed: the backward recomputes its logits
rather than keeping them. PPO's update, its old and reference log-probs and the SFT loss all go through
`token_logprobs`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from bp_ray.train.sft_data import IGNORE_INDEX

CHUNK_BYTES = 128 * 2**20
"""Float32 logits of one LM-head chunk: 16 positions of 8 BLOOM rows. The chunk's softmax, bf16 logits and
gradient come beside it, so a chunk's peak is a few times this."""

_SCALED_HEADS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config fields of models whose logits are not lm_head(last hidden state) alone (Gemma 2, Cohere, Granite)."""


def chunk_positions(batch: int, vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per LM-head call whose (batch, positions, vocab) float32 logits fit in chunk_bytes (at least 1)."""
    return max(1, chunk_bytes // (batch * vocab * 4))


def lm_inputs(model: Any, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Any]:
    """Keyword arguments of a causal LM's (or its backbone's) forward for a left-padded batch."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    # Left padding: models with learned or rotary positions need explicit ids; BLOOM's ALiBi reads the mask.
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return kwargs


def final_hidden_states(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, L, hidden) last hidden states of a Hugging Face causal LM (after its final norm): what its LM head,
    `model.get_output_embeddings()`, turns into logits. Raises for models that scale or cap their logits."""
    scaled = [name for name in _SCALED_HEADS if getattr(model.config, name, None) not in (None, 1.0)]
    if scaled:
        raise ValueError(f"{type(model).__name__} transforms its logits ({', '.join(scaled)}): the chunked "
                         "log-probs assume logits = lm_head(last hidden state)")
    backbone = model.base_model  # the model without its LM head
    return backbone(**lm_inputs(backbone, input_ids, attention_mask)).last_hidden_state


def _chunk_logprobs(head: torch.nn.Module, hidden: Tensor, targets: Tensor,
                    with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    logits = head(hidden).float()
    normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    if not with_entropy:
        return logprobs, None
    return logprobs, normaliser - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def token_logprobs(hidden: Tensor, head: torch.nn.Module, targets: Tensor, chunk: int = 0,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(B, N, hidden) states, the LM head and (B, N) token ids -> (B, N) float32 log-prob of each token under the
    logits of its own position, and (B, N) entropy of those distributions (None unless with_entropy).

    The head sees `chunk` positions at a time (0: chunk_positions' default for B and the vocabulary); with grad,
    each chunk is recomputed in the backward instead of keeping its logits."""
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    chunk = chunk or chunk_positions(hidden.shape[0], vocab)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[1], chunk):
        args = (head, hidden[:, start:start + chunk], targets[:, start:start + chunk], with_entropy)
        # Non-reentrant: the head's weights get their gradient without being inputs, and DeepSpeed's hooks on the
        # head run again in the recomputation as in any forward.
        piece, entropy = checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args)
        logprobs.append(piece)
        entropies.append(entropy)
    if not logprobs:  # no positions: nothing to chunk
        empty = hidden.new_zeros(hidden.shape[:2], dtype=torch.float32)
        return empty, empty.clone() if with_entropy else None
    return torch.cat(logprobs, dim=1), torch.cat(entropies, dim=1) if with_entropy else None


def target_token_loss(model: Any, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                      chunk: int = 0) -> Tensor:
    """Mean cross-entropy over the target tokens of a (B, L) batch, as a Hugging Face causal LM's `.loss` with
    these labels (shifted by one inside: position t predicts label t + 1; IGNORE_INDEX labels do not count), without
    its full float32 logits. Only the target positions go through the LM head."""
    hidden = final_hidden_states(model, input_ids, attention_mask)[:, :-1]
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    # The target positions of all rows as one row: the prompt's positions never reach the LM head.
    logprobs, _ = token_logprobs(hidden[counted][None], model.get_output_embeddings(), targets[counted][None], chunk)
    return -logprobs.mean()


class TargetTokenLoss(torch.nn.Module):
    """A causal LM whose forward is its SFT loss (`target_token_loss`), so that DeepSpeed wraps one module whose
    forward holds the whole computation, LM head chunks included."""

    def __init__(self, model: Any, chunk: int = 0):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        return target_token_loss(self.model, input_ids, attention_mask, labels, self.chunk)
