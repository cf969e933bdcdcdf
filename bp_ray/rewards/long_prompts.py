"""Prompts longer than the CLIP text encoder's 77 tokens: count them, or encode them whole in 75-token windows.

diffusers truncates every prompt to tokenizer.model_max_length (77 for SD 1.x: BOS + 75 tokens + EOS), so words
past token 75 never reach the image. The "long prompt" mode of A1111 and compel instead splits the tokens into
windows of 75, encodes each window as BOS ... EOS pad on its own, and concatenates the windows along the
sequence axis; the UNet's cross-attention takes any sequence length. A prompt of at most 75 tokens is one window
with exactly the token ids of the pipeline's own call, hence the same embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_lengths(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Tokens of each prompt, BOS and EOS included, without truncation (compare with tokenizer.model_max_length)."""
    if not prompts:
        return []
    # verbose=False: no "sequence length is longer than the maximum" warning; counting long prompts is the point.
    ids = tokenizer(list(prompts), add_special_tokens=True, truncation=False, verbose=False).input_ids
    return [len(row) for row in ids]


def prompt_windows(tokenizer, prompts: Sequence[str]) -> list[list[list[int]]]:
    """Per prompt, its token ids without BOS / EOS in windows of model_max_length - 2; an empty prompt has one
    empty window."""
    size = tokenizer.model_max_length - 2
    ids = tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False).input_ids
    return [[row[start:start + size] for start in range(0, len(row), size)] or [[]] for row in ids]


def window_count(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Windows of each prompt in the chunked mode: ceil(content tokens / (model_max_length - 2)), at least 1."""
    return [len(windows) for windows in prompt_windows(tokenizer, prompts)]


@torch.no_grad()
def _encode_windows(pipe, windows: list[list[list[int]]], num_windows: int) -> torch.Tensor:
    """(P, num_windows * L, D): window k of every prompt in one text-encoder call of shape (P, L), L the max length."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    # the pipeline passes the attention mask only to encoders configured to use it (none of SD 1.x / 2.x)
    use_mask = getattr(encoder.config, "use_attention_mask", False)
    encoded = []
    for k in range(num_windows):
        rows = [[tokenizer.bos_token_id, *(w[k] if k < len(w) else []), tokenizer.eos_token_id] for w in windows]
        # tokenizer.pad pads exactly as the pipeline's tokenizer(..., padding="max_length") call: same pad id and side
        batch = tokenizer.pad({"input_ids": rows}, padding="max_length", max_length=tokenizer.model_max_length,
                              return_tensors="pt")
        mask = batch.attention_mask.to(encoder.device) if use_mask else None
        # [0] is the last hidden state after the final layer norm: encode_prompt's choice for clip_skip=None
        encoded.append(encoder(batch.input_ids.to(encoder.device), attention_mask=mask)[0])
    return torch.cat(encoded, dim=1).to(dtype=encoder.dtype)


def chunked_prompt_embeds(pipe, prompts: Sequence[str], negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(P, W * L, D) prompt and negative-prompt embeddings in the long-prompt mode, L = model_max_length (77).

    W is the most windows any prompt (or the negative prompt) needs; shorter ones get empty-prompt windows
    (BOS EOS pad ...) at the end, so the whole batch and its negative share one sequence length, as classifier-free
    guidance needs. The negative prompt is encoded once per prompt in one batch, as encode_prompt does, so a batch
    of prompts of at most 75 tokens gives bit for bit the embeddings of pipe.encode_prompt.
    """
    prompts = list(prompts)
    if not prompts:
        empty = torch.zeros(0, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size,
                            dtype=pipe.text_encoder.dtype, device=pipe.text_encoder.device)
        return empty, empty.clone()
    windows = prompt_windows(pipe.tokenizer, prompts)
    negative_windows = prompt_windows(pipe.tokenizer, [negative_prompt]) * len(prompts)
    num_windows = max(len(w) for w in windows + negative_windows)
    return (_encode_windows(pipe, windows, num_windows), _encode_windows(pipe, negative_windows, num_windows))
