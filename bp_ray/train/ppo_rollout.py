"""PPO rollouts for a causal LM on one worker: sample responses to queries, read the log-probs and values of
each response token, and shape the sequence scores with the reward-hacking guards. Plain torch: the Ray
actors (reference, reward) and the training loop live in `ppo.py`.

Layout of a rollout: `input_ids` = the left-padded query (`query_len` columns) followed by the response
(right-padded after its first EOS). Response token t sits at column query_len + t, is predicted by the logits at
column query_len + t - 1, and its value is the critic's output at that same column (the state before emitting t).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bp_ray.data.colours import colours_changed
from bp_ray.data.policy_format import padded
from bp_ray.data.prompt_rules import repetition_share
from bp_ray.train.ppo_math import response_mask
from bp_ray.train.token_logprobs import final_hidden_states, lm_inputs, token_logprobs


@dataclass
class Rollout:
    """One worker's sampled batch."""

    input_ids: torch.Tensor
    """(B, query_len + response_len): query then response."""
    attention_mask: torch.Tensor
    query_len: int
    mask: torch.Tensor
    """(B, response_len) float: 1 on response tokens up to and including the first EOS or newline."""
    texts: list[str]
    """Decoded responses (special tokens dropped, first line, stripped)."""
    stopped: torch.Tensor | None = None
    """(B,) bool: the response ended with EOS or a newline rather than at max_new_tokens (None: not sampled here)."""

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.query_len:]

    def to(self, device: str | torch.device) -> Rollout:
        return Rollout(self.input_ids.to(device), self.attention_mask.to(device), self.query_len,
                       self.mask.to(device), self.texts, None if self.stopped is None else self.stopped.to(device))

    def select(self, rows: torch.Tensor | np.ndarray) -> Rollout:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Rollout(self.input_ids[rows], self.attention_mask[rows], self.query_len, self.mask[rows],
                       [self.texts[int(i)] for i in rows], None if self.stopped is None else self.stopped[rows])

    def trimmed(self) -> Rollout:
        """The same rows without the columns that are padding in every one of them: left of this batch's longest
        query, right of its longest response. The response's log-probs do not change (positions and ALiBi
        count from a row's first real token); an update on a few rows of a rollout computes less."""
        used = self.attention_mask[:, :self.query_len].any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        answered = self.mask.any(0).nonzero()
        length = int(answered[-1]) + 1 if len(answered) else self.mask.shape[1]
        end = self.query_len + length
        return Rollout(self.input_ids[:, first:end], self.attention_mask[:, first:end], self.query_len - first,
                       self.mask[:, :length], self.texts, self.stopped)


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


@functools.lru_cache(maxsize=8)
def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """EOS and every vocabulary entry whose text holds a newline: a prompt is its first line, so a response ends
    at its first newline as at EOS, and tokens after it neither earn reward nor take gradient."""
    vocab = range(len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in vocab], skip_special_tokens=False)
    return (tokenizer.eos_token_id, *(i for i, t in zip(vocab, texts, strict=True) if "\n" in t))


def end_responses(response: torch.Tensor, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Generated ids -> (ids padded after each row's first EOS or newline, that mask, the texts they decode to)."""
    mask = response_mask(response, stop_token_ids(tokenizer))
    response = response.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = [_first_line(t) for t in tokenizer.batch_decode(response, skip_special_tokens=True)]
    return response, mask, texts


@torch.no_grad()
def sample(model: Any, tokenizer: Any, queries: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
           max_query_tokens: int = 256) -> Rollout:
    """Generate one response per query (text, or the token ids of `policy_format.encode_prompts`; sampled, or
    greedy for evaluation) and mask everything after its first EOS or newline."""
    device = next(model.parameters()).device
    if queries and isinstance(queries[0], str):
        # A user's "</s>" is text, as in SFT's data and the endpoint (policy_format.TEXT_ONLY).
        encoded = tokenizer(list(queries), return_tensors="pt", padding=True, truncation=True,
                            max_length=max_query_tokens, split_special_tokens=True).to(device)
    else:
        encoded = padded(tokenizer, [list(ids)[:max_query_tokens] for ids in queries]).to(device)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p,
                                                     "top_k": 0}
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, **sampling)
    query_len = encoded["input_ids"].shape[1]
    response = output[:, query_len:]
    if response.shape[1] == 0:
        raise RuntimeError("generation produced no tokens; check ppo.max_new_tokens")
    stopped = torch.isin(response, torch.as_tensor(stop_token_ids(tokenizer), device=response.device)).any(dim=1)
    response, mask, texts = end_responses(response, tokenizer)
    return Rollout(torch.cat([encoded["input_ids"], response], dim=1),
                   torch.cat([encoded["attention_mask"], mask.to(encoded["attention_mask"].dtype)], dim=1),
                   query_len, mask.float(), texts, stopped)


def response_columns(hidden: torch.Tensor, response_len: int) -> torch.Tensor:
    """(B, L, ...) per-column outputs -> (B, response_len, ...) of the columns that predict the response tokens (the
    LM head and the critic never see the query's other columns)."""
    return hidden[:, -response_len - 1:-1]


def response_logprobs(model: Any, rollout: Rollout) -> torch.Tensor:
    """(B, response_len) log-prob of each response token under the causal LM `model` (grad flows if enabled)."""
    hidden = response_columns(final_hidden_states(model, rollout.input_ids, rollout.attention_mask),
                              rollout.response_ids.shape[1])
    return token_logprobs(hidden, model.get_output_embeddings(), rollout.response_ids)[0]


class PolicyModel(torch.nn.Module):
    """The policy alone, for the critic-free methods. Every model here answers forward(input_ids, attention_mask,
    targets, with_entropy) with the (B, R) log-probs of `targets` (the last R columns of input_ids), their (B, R)
    entropies (None unless with_entropy) and (B, R) values (None without a critic): the LM head runs in chunks
    inside this forward (token_logprobs), so DeepSpeed's engine sees all of it and no (B, R, vocab) tensor is made."""

    def __init__(self, policy: Any):
        super().__init__()
        self.policy = policy

    def policy_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                       with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(B, R) log-probs, (B, R) entropies or None, and the (B, R, hidden) states they came from."""
        hidden = response_columns(final_hidden_states(self.policy, input_ids, attention_mask), targets.shape[1])
        logprobs, entropy = token_logprobs(hidden, self.policy.get_output_embeddings(), targets,
                                           with_entropy=with_entropy)
        return logprobs, entropy, hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        logprobs, entropy, _ = self.policy_outputs(input_ids, attention_mask, targets, with_entropy)
        return logprobs, entropy, None


class SharedValueModel(PolicyModel):
    """Policy and critic on one backbone: the causal LM plus a scalar head on its last hidden state."""

    def __init__(self, policy: Any):
        super().__init__(policy)
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        logprobs, entropy, hidden = self.policy_outputs(input_ids, attention_mask, targets, with_entropy)
        return logprobs, entropy, self.value_head(hidden.float())[..., 0]


class SeparateValueModel(PolicyModel):
    """Policy and critic as two networks (the critic a token-regression copy of the SFT model) in one module, so
    one optimizer steps both on one total loss."""

    def __init__(self, policy: Any, critic: Any):
        super().__init__(policy)
        self.critic = critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        logprobs, entropy, _ = self.policy_outputs(input_ids, attention_mask, targets, with_entropy)
        values = self.critic(**lm_inputs(self.critic, input_ids, attention_mask)).logits[..., 0]
        return logprobs, entropy, response_columns(values, targets.shape[1])


# --- reward-hacking guards --------------------------------------------------------------------------------------

@dataclass
class Guards:
    """Reward shaping against reward hacking (each term logged): score = reward - baseline + relevance_coef *
    relevance - intent_hinge_coef * max(0, intent - intent_margin - relevance) - length_coef * words over
    max_words - repetition_coef * repetition share - missing_eos_penalty if the response was cut at
    max_new_tokens - colour_coef if it changes a colour the user gave. `intent` is the relevance of the user's own
    prompt, so the hinge charges a rewrite only for showing less of the request than the request itself does."""

    relevance_coef: float = 0.0
    max_words: int = 0
    length_coef: float = 0.0
    repetition_coef: float = 0.0
    intent_hinge_coef: float = 0.0
    intent_margin: float = 0.0
    missing_eos_penalty: float = 0.0
    colour_coef: float = 0.0

    def weights(self) -> dict[str, float]:
        """Each term's weight in the score (the baseline is subtracted apart)."""
        return {"reward": 1.0, "relevance": self.relevance_coef, "intent_shortfall": -self.intent_hinge_coef,
                "words_over_cap": -self.length_coef, "repetition": -self.repetition_coef,
                "missing_eos": -self.missing_eos_penalty, "colour_changed": -self.colour_coef}

    def terms(self, reward: np.ndarray, relevance: np.ndarray, texts: list[str], intent: np.ndarray | None = None,
              prompts: Sequence[str] | None = None, stopped: Any = None) -> dict[str, np.ndarray]:
        """(B,) values of every weighted term of the score, unweighted. `prompts`: the user prompts (for the colour
        term); `stopped`: (B,) whether each response ended before max_new_tokens (None: all did)."""
        words = np.array([len(t.split()) for t in texts], dtype=np.float64)
        shortfall = (np.maximum(np.asarray(intent) - self.intent_margin - relevance, 0.0) if intent is not None
                     else np.zeros_like(words))
        cut = (np.zeros_like(words) if stopped is None
               else 1.0 - np.asarray(stopped.cpu() if hasattr(stopped, "cpu") else stopped, dtype=np.float64))
        changed = (np.zeros_like(words) if prompts is None
                   else np.array([bool(colours_changed(p, t)) for p, t in zip(prompts, texts, strict=True)],
                                 dtype=np.float64))
        return {"reward": np.asarray(reward, dtype=np.float64), "relevance": np.asarray(relevance, dtype=np.float64),
                "intent_shortfall": shortfall,
                "words_over_cap": np.maximum(words - self.max_words, 0.0) if self.max_words else np.zeros_like(words),
                "repetition": np.array([repetition_share(t) for t in texts], dtype=np.float64),
                "missing_eos": cut, "colour_changed": changed}

    def shape(self, reward: np.ndarray, baseline: np.ndarray, relevance: np.ndarray, texts: list[str],
              intent: np.ndarray | None = None, prompts: Sequence[str] | None = None,
              stopped: Any = None) -> tuple[np.ndarray, dict[str, float]]:
        """(B,) scores for PPO and the batch means of every term."""
        terms = self.terms(reward, relevance, texts, intent, prompts, stopped)
        score = sum(weight * terms[name] for name, weight in self.weights().items()) - baseline
        logged = {"reward/combined": reward, "reward/baseline": baseline, "reward/relevance": relevance,
                  "reward/score": score, "guard/words": np.array([len(t.split()) for t in texts], dtype=np.float64),
                  "guard/words_over_cap": terms["words_over_cap"], "guard/repetition": terms["repetition"],
                  "guard/intent_shortfall": terms["intent_shortfall"],
                  "guard/intent_kept": (terms["intent_shortfall"] == 0).astype(np.float64),
                  "guard/missing_eos": terms["missing_eos"], "guard/colour_changed": terms["colour_changed"]}
        return score, {name: float(np.mean(values)) for name, values in logged.items()}
