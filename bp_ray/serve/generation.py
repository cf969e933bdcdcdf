"""Batched generation for the endpoint: many requests, each with its own n, seed, temperature, top-p, length, stop
strings, repetition controls (a repetition penalty, no repeated n-grams) and decoding constraints (avoided and
preferred phrases, a minimum length), in one `model.generate` call.

Plain Python and torch, no Ray. Every output row samples from its own seeded random stream, so a request's
outputs depend on its seed only, not on which other requests shared its batch (up to the last float bits of
batched kernels, as with any batched inference).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bp_ray.data.policy_format import (
    TEXT_ONLY,
    encode_prompts,
    format_prompt,
    leading_tokens,
    padded,
    policy_text,
)
from bp_ray.data.prompt_rules import first_line
from bp_ray.serve.token_rules import CompiledRules, TokenRules, token_rules


@dataclass(frozen=True)
class GenerationRequest:
    """One request: `text` is the model input as is (the instruction template is already applied, if any)."""

    text: str
    n: int = 1
    max_new_tokens: int = 32
    temperature: float = 0.7
    """0 means greedy."""
    top_p: float = 1.0
    seed: int = 0
    """Output i samples with seed + i."""
    stop: tuple[str, ...] = ()
    prompt: str | None = None
    """The user's own text inside `text` where a template wraps it (beautify); None: `text` is all the user's.
    It must hold text tokens of its own, else the request is refused (see `refusals`)."""
    instruction: str | None = None
    """The template `text` was made from (`beautify_input(instruction, prompt, keep_prompt)`): its own control
    tokens (a chat template's `<|im_start|>`) are then encoded as control tokens, the user's text as text."""
    keep_prompt: bool = False
    avoid: tuple[str, ...] = ()
    """Phrases the outputs must not contain: their token sequences are banned at decoding (see `token_rules`)."""
    avoid_words: tuple[str, ...] = ()
    """Words the outputs must not write as words: banned at decoding only after a space, as given and Capitalised
    (see `token_rules.word_token_ids`), so the same letters inside another word ("red" in "hundred") stay free."""
    prefer: tuple[str, ...] = ()
    """Phrases (a style family's words) whose tokens get `prefer_bias` added to their logits."""
    prefer_bias: float = 0.0
    """Added to the logits before temperature scaling: e^bias times as likely at temperature 1."""
    min_new_tokens: int = 0
    """EOS and tokens that contain a stop string are banned until an output has this many tokens (at most its
    max_new_tokens)."""
    repetition_penalty: float = 1.0
    """Above 1: a token the output already holds has its logit divided by this (multiplied, if negative; Keskar
    et al. 2019, as transformers does); 1 is off. Only the generated tokens count, never the prompt."""
    no_repeat_ngram_size: int = 0
    """n > 0: no n tokens in a row occur twice in an output (a token that would repeat an n-gram is banned); 0 is
    off. Only the generated tokens count, so an output may still repeat the user's own words."""


@dataclass
class Completion:
    text: str
    completion_tokens: int
    finish_reason: str
    """"stop" (EOS or a stop string) or "length" (hit max_new_tokens)."""


@dataclass
class GenerationResult:
    prompt_tokens: int
    completions: list[Completion] = field(default_factory=list)
    refused: str | None = None
    """Why the request was not generated (no completions then); the caller names the field."""


@dataclass(frozen=True)
class _Row:
    request: int
    seed: int
    temperature: float
    top_p: float
    max_new_tokens: int
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


def beautify_input(instruction: str, prompt: str, keep_prompt: bool = False) -> str:
    """The training template around a user prompt (the SFT model learned to continue exactly this)."""
    return format_prompt(instruction, prompt.strip(), keep_prompt)


def beautified_text(completion: str, prompt: str = "", keep_prompt: bool = False) -> str:
    """The rewrite a user sees: the first line, trimmed (training targets are one line); with keep_prompt, the
    user prompt and then the model's additions."""
    return policy_text(prompt, first_line(completion).strip(), keep_prompt)


def rows_in(requests: Sequence[GenerationRequest]) -> int:
    """Output rows of the requests (n each): what a batch of them costs."""
    return sum(request.n for request in requests)


def _expand(requests: Sequence[GenerationRequest], indices: Sequence[int] | None = None) -> list[_Row]:
    """One row per output of the requests at `indices` (all by default); `_Row.request` indexes `requests`."""
    chosen = range(len(requests)) if indices is None else indices
    return [_Row(index, requests[index].seed + i, requests[index].temperature, requests[index].top_p,
                 requests[index].max_new_tokens, requests[index].repetition_penalty,
                 requests[index].no_repeat_ngram_size) for index in chosen for i in range(requests[index].n)]


def refusals(tokenizer: Any, requests: Sequence[GenerationRequest]) -> list[str | None]:
    """Why each request cannot be generated, or None: its user text must give the model some visible text.

    Text can tokenize to nothing (a normalising tokenizer drops invisible characters), or only to special tokens
    (a tokenizer without byte fallback maps unknown characters to `<unk>`): such a prompt would be generated from
    control marks, or be an empty row (no attention at all). The strings of special tokens (`</s>`) are text
    (TEXT_ONLY)."""
    texts = [request.text if request.prompt is None else request.prompt for request in requests]
    special = set(tokenizer.all_special_ids)
    reasons: list[str | None] = []
    for ids in tokenizer(texts, **TEXT_ONLY)["input_ids"]:
        plain = [token for token in ids if token not in special]
        if plain and tokenizer.decode(plain).strip():
            reasons.append(None)
        elif len(plain) == len(ids):
            reasons.append("tokenizes to no text tokens for this model: send the prompt's text")
        else:
            names = ", ".join(dict.fromkeys(tokenizer.convert_ids_to_tokens([t for t in ids if t in special])))
            reasons.append(f"tokenizes only to the special tokens {names}, which the model reads as control "
                           "marks, not text: send the prompt's text")
    return reasons


class RowSampler:
    """A logits processor that picks every row's next token itself and returns a one-hot score, so that
    `generate` in greedy mode takes exactly that token.

    Each row draws its uniforms from its own `torch.Generator(seed)`, all up front, and samples by inverse CDF
    over the top-p nucleus; greedy rows (temperature 0) take the argmax. Past its own max_new_tokens a row is
    handed EOS, so a short request ends without waiting for the longest one.

    `rules` (one per row, None for an unconstrained row) bias and ban tokens before the row samples: a banned
    token gets no probability mass, and the row still uses its own uniform of that step, so constraints on one
    row never move another row's tokens. Only the generated tokens count towards a banned or preferred prefix,
    never the prompt. A row's repetition penalty and n-gram ban (`GenerationRequest`) apply first, on its own
    generated tokens.
    """

    def __init__(self, rows: Sequence[_Row], prompt_len: int, eos_token_id: int, device: torch.device,
                 rules: Sequence[TokenRules | None] = ()):
        steps = max(row.max_new_tokens for row in rows) + 1
        self.uniforms = torch.stack([torch.rand(steps, generator=torch.Generator("cpu").manual_seed(row.seed))
                                     for row in rows]).to(device)
        self.temperatures = torch.tensor([row.temperature for row in rows], device=device)
        self.top_ps = torch.tensor([row.top_p for row in rows], device=device)
        self.limits = torch.tensor([row.max_new_tokens for row in rows], device=device)
        self.greedy = self.temperatures == 0
        self.nucleus = bool((self.top_ps < 1).any())
        self.prompt_len = prompt_len
        self.eos_token_id = eos_token_id
        # Rows of one request (and requests of equal constraints) share a TokenRules: each is compiled once.
        compiled = {r: CompiledRules(r) for r in set(rules) if r}
        self.row_rules = [(i, compiled[r]) for i, r in enumerate(rules) if r]
        self.depth = max((r.depth for _, r in self.row_rules), default=0)
        # What does not depend on the generated tokens is indexed once: the tokens banned everywhere, the first
        # tokens of preferred phrases, and the tokens held back until a row's min_new_tokens.
        self.always_banned = _index([(i, t) for i, r in self.row_rules for t in r.banned.single], device)
        self.first_preferred = _index([(i, t) for i, r in self.row_rules for t in r.preferred.first], device)
        self.first_bias = torch.tensor([r.bias for _, r in self.row_rules for _ in r.preferred.first],
                                       device=device)
        self.held = _index([(i, t) for i, r in self.row_rules for t in r.held], device)
        self.held_until = torch.tensor([r.min_new_tokens for _, r in self.row_rules for _ in r.held],
                                       device=device)
        self.with_prefixes = [(i, r) for i, r in self.row_rules if r.depth]
        self.row_bias = {i: r.bias for i, r in self.row_rules}
        self.penalties = torch.tensor([row.repetition_penalty for row in rows], device=device)
        self.penalised = self.penalties != 1.0
        self.ngram_rows = [(i, row.no_repeat_ngram_size) for i, row in enumerate(rows) if row.no_repeat_ngram_size]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        scores = scores.float()
        if step and (self.ngram_rows or bool(self.penalised.any())):
            scores = self._discourage_repeats(input_ids[:, self.prompt_len:], scores)
        if self.row_rules:
            scores = self._constrained(input_ids, scores, step)
        temperatures = torch.where(self.greedy, torch.ones_like(self.temperatures), self.temperatures)
        probs = torch.softmax(scores / temperatures[:, None], dim=-1)
        # Inverse CDF works in any token order: without a nucleus there is no need to sort.
        chosen = self._inverse_cdf(probs, step)
        if self.nucleus:
            ordered, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            outside = (ordered.cumsum(dim=-1) - ordered) >= self.top_ps[:, None]
            in_nucleus = order.gather(1, self._inverse_cdf(ordered.masked_fill(outside, 0.0), step)[:, None])
            # Only top_p < 1 rows take the sorted order: the same uniform picks another token there, and a row's
            # token must not depend on whether its batch holds a nucleus row.
            chosen = torch.where(self.top_ps < 1, in_nucleus.squeeze(1), chosen)
        chosen = torch.where(self.greedy, scores.argmax(dim=-1), chosen)
        chosen = torch.where(step >= self.limits, torch.full_like(chosen, self.eos_token_id), chosen)
        one_hot = torch.full_like(scores, float("-inf"))
        one_hot[torch.arange(len(chosen), device=scores.device), chosen] = 0.0
        return one_hot

    def _inverse_cdf(self, probs: torch.Tensor, step: int) -> torch.Tensor:
        """(B,) the token each row's uniform of this step lands on, in the columns' order."""
        cumulative = probs.cumsum(dim=-1)
        targets = self.uniforms[:, step : step + 1] * cumulative[:, -1:]
        return torch.searchsorted(cumulative, targets).clamp(max=probs.shape[-1] - 1).squeeze(1)

    def _discourage_repeats(self, generated: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """`scores` with each row's repetition penalty on the tokens it generated, then the tokens that would
        repeat one of its n-grams at -inf."""
        scores = scores.clone()  # the model's logits buffer stays as it was
        if bool(self.penalised.any()):
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated, True) & self.penalised[:, None]
            penalty = self.penalties[:, None]
            scores = torch.where(seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)
        banned = [(i, token) for i, size in self.ngram_rows
                  for token in repeating_tokens(generated[i].tolist(), size)]
        if banned:
            rows, cols = _index(banned, scores.device)
            scores[rows, cols] = float("-inf")
        return scores

    def _constrained(self, input_ids: torch.Tensor, scores: torch.Tensor, step: int) -> torch.Tensor:
        """`scores` with the constrained rows' preferred tokens raised, then their banned tokens at -inf."""
        scores = scores.clone()  # the model's logits buffer stays as it was
        rows, cols = self.first_preferred
        scores[rows, cols] += self.first_bias
        # Only the last `depth` generated tokens (never the prompt) can end a banned or preferred prefix.
        span = min(step, self.depth)
        prefer: list[tuple[int, int]] = []
        ban: list[tuple[int, int]] = []
        if span:
            tails = input_ids[:, input_ids.shape[1] - span:].tolist()
            for i, rules in self.with_prefixes:
                # A token both first and next of preferred phrases gets the bias once.
                prefer += [(i, t) for t in rules.preferred.after(tails[i]) if t not in rules.preferred.first]
                ban += [(i, t) for t in rules.banned.after(tails[i])]
        if prefer:
            rows, cols = _index(prefer, scores.device)
            scores[rows, cols] += torch.tensor([self.row_bias[i] for i, _ in prefer], device=scores.device)
        for rows, cols in (self.always_banned, _index(ban, scores.device)):
            scores[rows, cols] = float("-inf")
        rows, cols = self.held
        active = step < self.held_until
        scores[rows[active], cols[active]] = float("-inf")
        return scores


def repeating_tokens(tokens: Sequence[int], size: int) -> set[int]:
    """The tokens that, appended to `tokens`, would make an n-gram of `size` tokens occur a second time."""
    if size <= 0 or len(tokens) < size - 1:
        return set()
    head = list(tokens[len(tokens) - size + 1:]) if size > 1 else []
    return {tokens[start + size - 1] for start in range(len(tokens) - size + 1)
            if list(tokens[start:start + size - 1]) == head}


def _index(pairs: Sequence[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) pairs as the two index tensors of `scores[rows, cols]`."""
    rows = torch.tensor([row for row, _ in pairs], dtype=torch.long, device=device)
    cols = torch.tensor([token for _, token in pairs], dtype=torch.long, device=device)
    return rows, cols


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def request_ids(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """The model input of a request: the template's control tokens as SFT saw them, everything else as text."""
    if request.instruction is not None and request.prompt is not None:
        return encode_prompts(tokenizer, request.instruction, [request.prompt.strip()], request.keep_prompt)[0]
    return leading_tokens(tokenizer) + tokenizer(request.text, **TEXT_ONLY)["input_ids"]


@torch.no_grad()
def _run_generate(model: Any, tokenizer: Any, requests: Sequence[GenerationRequest], rows: Sequence[_Row],
                  streamer: Any = None) -> tuple[torch.Tensor, list[int]]:
    device = next(model.parameters()).device
    ids = {index: request_ids(tokenizer, requests[index]) for index in {row.request for row in rows}}
    encoded = padded(tokenizer, [ids[row.request] for row in rows]).to(device)
    prompt_len = encoded["input_ids"].shape[1]
    prompt_tokens = encoded["attention_mask"].sum(dim=1).tolist()
    rules = {index: token_rules(tokenizer, requests[index]) for index in {row.request for row in rows}}
    sampler = RowSampler(rows, prompt_len, tokenizer.eos_token_id, device, [rules[row.request] for row in rows])
    output = model.generate(**encoded, do_sample=False, logits_processor=[sampler],
                            max_new_tokens=max(row.max_new_tokens for row in rows) + 1,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            streamer=streamer)
    return output[:, prompt_len:], prompt_tokens


def _response_tokens(ids: Sequence[int], eos_token_id: int, limit: int) -> tuple[list[int], str]:
    ids = list(ids)
    if eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id)]
    return (ids, "length") if len(ids) >= limit else (ids, "stop")


def generate(model: Any, tokenizer: Any, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """All requests' outputs (n each) from one batched `generate` call, in request order."""
    if not requests:
        return []
    refused = refusals(tokenizer, requests)
    results = [GenerationResult(prompt_tokens=0, refused=reason) for reason in refused]
    rows = _expand(requests, [i for i, reason in enumerate(refused) if reason is None])
    if not rows:
        return results
    responses, prompt_tokens = _run_generate(model, tokenizer, requests, rows)
    for row, response, used in zip(rows, responses.tolist(), prompt_tokens, strict=True):
        request = requests[row.request]
        ids, finish = _response_tokens(response, tokenizer.eos_token_id, row.max_new_tokens)
        text, stopped = _cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), request.stop)
        results[row.request].prompt_tokens = int(used)
        results[row.request].completions.append(Completion(text, len(ids), "stop" if stopped else finish))
    return results


class _StepQueue:
    """A `generate` streamer: hands each step's (rows,) new token ids to the consuming thread."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first puts the prompt ids
            self._prompt_seen = True
            return
        self.items.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.items.put(None)


@dataclass
class StreamDelta:
    """New text of output `index`; `finish_reason` is set on its last delta."""

    index: int
    text: str
    finish_reason: str | None = None
    refused: str | None = None
    """Set on the only delta of a request that is not generated (see `refusals`)."""


def stream(model: Any, tokenizer: Any, request: GenerationRequest, interval_s: float = 0.0
           ) -> Iterator[StreamDelta]:
    """One request's n outputs token by token (or `interval_s` at a time, see `stream_batch`), as text deltas; the
    same tokens `generate` returns for it. A refused request yields one delta that says why, before anything is
    generated."""
    for step in stream_batch(model, tokenizer, [request], interval_s):
        yield from step[0]


def _merged(pending: list[dict[int, StreamDelta]]) -> list[list[StreamDelta]]:
    return [list(deltas.values()) for deltas in pending]


def stream_batch(model: Any, tokenizer: Any, requests: Sequence[GenerationRequest], interval_s: float = 0.0
                 ) -> Iterator[list[list[StreamDelta]]]:
    """Many requests' outputs from one batched `generate` call, as they are generated: per yield, each request's new
    deltas (`StreamDelta.index` is the output's index within its request, at most one delta per output).
    Refused requests get their one delta in the first yield and take no row.

    interval_s 0 yields every generation step. Above 0, the first tokens go out at once and later steps are
    gathered until `interval_s` has passed since the last yield: a served stream then costs the ingress, the
    proxy and the client one event per interval instead of one per token (measured: streamed chat at 32 clients
    spent 5x the CPU per request of plain chat with an event per token).

    Generation runs on a background thread; this generator decodes as tokens arrive.
    """
    refused = refusals(tokenizer, requests)
    if any(refused):
        yield [[StreamDelta(0, "", refused=reason)] if reason else [] for reason in refused]
    rows = _expand(requests, [i for i, reason in enumerate(refused) if reason is None])
    if not rows:
        return
    output_index = [row.seed - requests[row.request].seed for row in rows]
    steps = _StepQueue()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            _run_generate(model, tokenizer, requests, rows, streamer=steps)
        except BaseException as error:  # surfaced to the consumer below
            errors.append(error)
            steps.end()

    thread = threading.Thread(target=work, name="bp-ray-stream", daemon=True)
    thread.start()
    tokens: list[list[int]] = [[] for _ in rows]
    sent = ["" for _ in rows]
    done = [False for _ in rows]
    pending: list[dict[int, StreamDelta]] = [{} for _ in requests]
    last_yield = -math.inf
    while not all(done):
        step = steps.items.get()
        if step is None:
            break
        for i, token in enumerate(step):
            if done[i]:
                continue
            finish = None
            if token == tokenizer.eos_token_id:
                finish = "length" if len(tokens[i]) >= rows[i].max_new_tokens else "stop"
            else:
                tokens[i].append(token)
            text = tokenizer.decode(tokens[i], skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, requests[rows[i].request].stop)
            if stopped:
                finish = "stop"
            # Hold back a trailing partial character until its next byte arrives.
            if finish is None and text.endswith("\ufffd"):
                continue
            delta, sent[i] = text[len(sent[i]):], text
            if delta or finish:
                held = pending[rows[i].request].get(output_index[i])
                pending[rows[i].request][output_index[i]] = StreamDelta(
                    output_index[i], (held.text if held else "") + delta, finish)
            done[i] = finish is not None
        if any(pending) and time.monotonic() - last_yield >= interval_s:
            yield _merged(pending)
            pending, last_yield = [{} for _ in requests], time.monotonic()
    thread.join()
    if errors:
        raise errors[0]
    for i, finished in enumerate(done):
        if not finished:  # generate ended on its own length limit
            held = pending[rows[i].request].get(output_index[i])
            pending[rows[i].request][output_index[i]] = StreamDelta(output_index[i], held.text if held else "",
                                                                    "length")
    if any(pending):
        yield _merged(pending)
