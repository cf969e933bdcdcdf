"""Batched generation of the endpoint (no Ray, no HTTP): per-row seeds, temperatures, lengths, stop strings and
decoding constraints (avoid, prefer, min_new_tokens) in one `generate` call, and streaming that yields the same
tokens."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import pytest
import torch

from bp_ray.data.vocab import load_vocab
from bp_ray.serve.generation import GenerationRequest, RowSampler, _expand, _Row, _run_generate, generate, stream
from bp_ray.serve.token_rules import TokenRules, stop_token_ids, word_token_ids


@pytest.fixture(scope="module")
def lm(tiny_models_cfg):
    from bp_ray.models.loading import load_causal_lm

    torch.set_num_threads(1)
    return load_causal_lm("tiny:bloom", tiny_models_cfg, device="cpu")


def texts(result) -> list[str]:
    return [c.text for c in result.completions]


def test_a_request_gets_the_same_outputs_alone_or_in_any_batch(lm):
    model, tokenizer = lm
    request = GenerationRequest("a cat on a sofa", n=3, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    alone = generate(model, tokenizer, [request])[0]
    others = [GenerationRequest(f"a house {i} by the sea at night", n=2, max_new_tokens=20, temperature=0.5,
                                seed=100 + i) for i in range(3)]
    batched = generate(model, tokenizer, [others[0], request, *others[1:]])
    assert texts(batched[1]) == texts(alone)
    assert batched[1].prompt_tokens == alone.prompt_tokens == len(tokenizer("a cat on a sofa")["input_ids"])
    assert len({*texts(alone)}) == 3  # seeds 5, 6, 7 sample different outputs
    # Output i is output 0 of the same request with seed + i.
    shifted = generate(model, tokenizer, [GenerationRequest("a cat on a sofa", n=1, max_new_tokens=12,
                                                            temperature=1.0, top_p=0.9, seed=6)])[0]
    assert texts(shifted) == texts(alone)[1:2]


def test_each_row_keeps_its_own_length_limit_and_finish_reason(lm):
    model, tokenizer = lm
    short, long = (GenerationRequest("a red car", max_new_tokens=n, temperature=1.0, seed=1) for n in (3, 20))
    results = generate(model, tokenizer, [short, long])
    assert results[0].completions[0].completion_tokens <= 3
    assert results[1].completions[0].completion_tokens <= 20
    for result, limit in zip(results, (3, 20), strict=True):
        completion = result.completions[0]
        assert completion.finish_reason == ("length" if completion.completion_tokens == limit else "stop")


def test_greedy_rows_take_the_argmax_and_ignore_their_seed(lm):
    model, tokenizer = lm
    greedy = [GenerationRequest("a blue bird", max_new_tokens=8, temperature=0.0, seed=s) for s in (1, 2)]
    a, b = generate(model, tokenizer, greedy)
    assert texts(a) == texts(b)
    reference = model.generate(**tokenizer(["a blue bird"], return_tensors="pt"), do_sample=False,
                               max_new_tokens=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    expected = tokenizer.decode(reference[0, -8:], skip_special_tokens=True)
    assert expected.startswith(texts(a)[0])


def test_the_sampler_draws_from_the_nucleus_only():
    # Row 0: probabilities 0.5, 0.3, 0.2 with top_p 0.6 -> nucleus {0, 1}; row 1 greedy -> token 2.
    rows = [_Row(0, seed, 1.0, 0.6, 5) for seed in range(200)] + [_Row(1, 0, 0.0, 1.0, 5)]
    sampler = RowSampler(rows, prompt_len=0, eos_token_id=3, device=torch.device("cpu"))
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]] * 200 + [[0.1, 0.2, 0.7, 1e-9]]))
    chosen = sampler(torch.zeros(201, 0, dtype=torch.long), scores).argmax(dim=-1)
    assert set(chosen[:200].tolist()) == {0, 1}
    share = (chosen[:200] == 0).float().mean().item()
    assert 0.5 < share < 0.75  # 0.5 / 0.8 = 0.625 within the nucleus
    assert chosen[200].item() == 2
    # Past its max_new_tokens a row is handed EOS.
    assert sampler(torch.zeros(201, 5, dtype=torch.long), scores).argmax(dim=-1).eq(3).all()


def test_stop_strings_end_an_output(lm):
    model, tokenizer = lm
    free = generate(model, tokenizer, [GenerationRequest("a cat", max_new_tokens=24, temperature=1.0, seed=3)])
    text = free[0].completions[0].text
    assert len(text) > 4
    stop = text[3:5]
    cut = generate(model, tokenizer, [GenerationRequest("a cat", max_new_tokens=24, temperature=1.0, seed=3,
                                                        stop=(stop,))])[0].completions[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"


def test_streaming_yields_the_same_text_as_generate(lm):
    model, tokenizer = lm
    request = GenerationRequest("a cat on a sofa", n=2, max_new_tokens=10, temperature=1.0, seed=8, stop=("\n",))
    expected = generate(model, tokenizer, [request])[0].completions
    deltas = list(stream(model, tokenizer, request))
    for i, completion in enumerate(expected):
        mine = [d for d in deltas if d.index == i]
        assert "".join(d.text for d in mine) == completion.text
        assert mine[-1].finish_reason == completion.finish_reason
        assert all(d.finish_reason is None for d in mine[:-1])


def test_a_stream_interval_gathers_tokens_into_fewer_deltas_with_the_same_text(lm):
    model, tokenizer = lm
    request = GenerationRequest("a cat on a sofa", n=2, max_new_tokens=16, temperature=1.0, seed=8)
    every_token = list(stream(model, tokenizer, request))
    # An interval longer than the whole generation: the first tokens at once, then the rest in one delta each.
    gathered = list(stream(model, tokenizer, request, interval_s=60.0))
    for i in range(request.n):
        mine, theirs = [d for d in gathered if d.index == i], [d for d in every_token if d.index == i]
        assert "".join(d.text for d in mine) == "".join(d.text for d in theirs)
        assert mine[-1].finish_reason == theirs[-1].finish_reason
        assert len(mine) == 2 < len(theirs)


# --- decoding constraints: avoid, prefer, min_new_tokens ------------------------------------------------------------

def greedy_rows(count: int, limit: int = 5) -> list[_Row]:
    return [_Row(i, 0, 0.0, 1.0, limit) for i in range(count)]


def test_a_banned_sequence_ends_only_after_its_generated_prefix():
    # Token 5 is the argmax, then 2, then 4. Bans: [5] always; [1, 2]: 2 only right after a generated 1.
    scores = torch.log(torch.tensor([[0.01, 0.02, 0.3, 0.01, 0.2, 0.46]] * 2))
    rules = TokenRules(banned=((5,), (1, 2)))
    sampler = RowSampler(greedy_rows(2), prompt_len=1, eos_token_id=0, device=torch.device("cpu"),
                         rules=[rules, None])
    # Step 0: the prompt ends with 1, but only generated tokens count -> row 0 takes 2; row 1 is unconstrained.
    assert sampler(torch.tensor([[1], [1]]), scores).argmax(dim=-1).tolist() == [2, 5]
    # Step 1 after a generated 1: 2 is banned too -> 4.
    assert sampler(torch.tensor([[1, 1], [1, 1]]), scores).argmax(dim=-1).tolist() == [4, 5]
    assert sampler(torch.tensor([[1, 3], [1, 3]]), scores).argmax(dim=-1).tolist() == [2, 5]


def test_banned_tokens_are_never_sampled_and_other_rows_keep_their_draws():
    scores = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 400))
    rows = [_Row(0, seed, 1.0, 1.0, 5) for seed in range(200)] + [_Row(1, seed, 1.0, 1.0, 5) for seed in range(200)]
    rules = TokenRules(banned=((0,),))
    free = RowSampler(rows, 0, eos_token_id=3, device=torch.device("cpu"))
    banned = RowSampler(rows, 0, eos_token_id=3, device=torch.device("cpu"), rules=[rules] * 200 + [None] * 200)
    input_ids = torch.zeros(400, 0, dtype=torch.long)
    chosen_free, chosen = free(input_ids, scores).argmax(dim=-1), banned(input_ids, scores).argmax(dim=-1)
    assert 0 not in chosen[:200].tolist() and 0 in chosen_free[:200].tolist()
    assert torch.equal(chosen[200:], chosen_free[200:])


def test_preferred_phrases_raise_their_first_and_next_tokens():
    # Token 0 leads (0.4); a bias of 2 on token 3, the first of [3, 1], makes it 0.1 e^2 = 0.74 and the argmax.
    scores = torch.log(torch.tensor([[0.4, 0.25, 0.25, 0.1]]))
    sampler = RowSampler(greedy_rows(1), 0, eos_token_id=2, device=torch.device("cpu"),
                         rules=[TokenRules(preferred=((3, 1),), prefer_bias=2.0)])
    assert sampler(torch.zeros(1, 0, dtype=torch.long), scores).argmax(dim=-1).item() == 3
    # After a generated 3 the continuation 1 is raised too: 0.25 e^2 = 1.85 beats 3's 0.74; after a 2 it is not.
    assert sampler(torch.tensor([[2]]), scores).argmax(dim=-1).item() == 3


def test_min_new_tokens_holds_back_eos_and_stop_tokens_then_lets_them_go():
    scores = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1]]))  # EOS (1) leads, then the stop token 2
    sampler = RowSampler(greedy_rows(1, limit=10), 0, eos_token_id=1, device=torch.device("cpu"),
                         rules=[TokenRules(min_new_tokens=2, held=(1, 2))])
    assert sampler(torch.zeros(1, 1, dtype=torch.long), scores).argmax(dim=-1).item() in (0, 3)
    assert sampler(torch.zeros(1, 2, dtype=torch.long), scores).argmax(dim=-1).item() == 1


def has_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE) is not None


MANY = dict(n=40, max_new_tokens=24, temperature=1.0, seed=0)
"""40 rows of one request: the tiny model's random weights write a soup of its vocabulary's words."""


def test_avoided_phrases_never_appear_in_what_the_model_writes(lm):
    model, tokenizer = lm
    free = texts(generate(model, tokenizer, [GenerationRequest("a cat on a sofa", **MANY)])[0])
    # The words the free model writes most (in 2+ outputs) and a two-word phrase it wrote: each is there to ban.
    counts = Counter(w for text in free for w in {w.lower() for w in re.findall(r"[a-z]{4,}", text, re.I)})
    words = [w for w, n in counts.most_common() if n >= 2][:5]
    pair = next(m.group(0) for text in free for m in re.finditer(r"(?<!\w)[a-z]{3,} [a-z]{3,}(?!\w)", text))
    avoid = (*words, pair)
    assert len(words) == 5 and all(any(has_phrase(text, phrase) for text in free) for phrase in avoid)
    banned = texts(generate(model, tokenizer, [GenerationRequest("a cat on a sofa", avoid=avoid, **MANY)])[0])
    assert banned != free
    assert not [(phrase, text) for text in banned for phrase in avoid if has_phrase(text, phrase)]


def test_avoided_words_are_banned_as_words_and_stay_free_inside_other_words(lm):
    model, tokenizer = lm
    free = texts(generate(model, tokenizer, [GenerationRequest("a cat on a sofa", **MANY)])[0])
    counts = Counter(w for text in free for w in set(re.findall(r"(?<= )[a-z]{4,}(?!\w)", text)))
    words = tuple(w for w, n in counts.most_common() if n >= 2)[:5]
    assert len(words) == 5
    banned = texts(generate(model, tokenizer, [GenerationRequest("a cat on a sofa", avoid_words=words, **MANY)])[0])
    assert banned != free
    assert not [(w, text) for text in banned for w in words if re.search(rf" ({w}|{w.capitalize()})(?!\w)", text)]
    spaced = {tuple(tokenizer(f"a {form}", add_special_tokens=False)["input_ids"][1:])
              for form in ("red", "Red")}
    assert spaced <= set(word_token_ids(tokenizer, ["red"]))
    bare = tuple(tokenizer("red", add_special_tokens=False)["input_ids"])
    assert bare not in spaced and bare not in word_token_ids(tokenizer, ["red"])  # the piece ending "hundred"


def test_a_style_bias_makes_its_phrases_more_common(lm):
    model, tokenizer = lm
    photo = load_vocab().style_families["photo"]

    def share(bias: float) -> int:
        request = GenerationRequest("a cat on a sofa", prefer=photo, prefer_bias=bias, **MANY)
        return sum(any(has_phrase(text, p) for p in photo) for text in texts(generate(model, tokenizer, [request])[0]))

    unbiased, biased = share(0.0), share(4.0)
    assert biased >= unbiased + 10, (unbiased, biased)


def test_min_new_tokens_holds_back_the_end_until_then(lm):
    model, tokenizer = lm
    # Stop at any "e": without a minimum most outputs would end within a few tokens.
    held = {*stop_token_ids(tokenizer, ["e"]), tokenizer.eos_token_id}

    def first_end(min_new_tokens: int) -> tuple[list[int], list[list[int]], GenerationRequest]:
        request = GenerationRequest("a cat on a sofa", stop=("e",), min_new_tokens=min_new_tokens, **MANY)
        ids = _run_generate(model, tokenizer, [request], _expand([request]))[0].tolist()
        return [next((i for i, t in enumerate(row) if t in held), len(row)) for row in ids], ids, request

    free, _, _ = first_end(0)
    assert min(free) < 8  # the test can fail
    ends, ids, request = first_end(8)
    assert min(ends) >= 8
    for completion, row in zip(generate(model, tokenizer, [request])[0].completions, ids, strict=True):
        assert completion.text.startswith(tokenizer.decode(row[:8], skip_special_tokens=True))
        assert completion.finish_reason == "stop"
    # A minimum past max_new_tokens ends at max_new_tokens.
    capped = generate(model, tokenizer, [GenerationRequest("a cat", n=8, max_new_tokens=4, temperature=1.0,
                                                           stop=("e",), min_new_tokens=10)])[0]
    assert {(c.completion_tokens, c.finish_reason) for c in capped.completions} == {(4, "length")}
    assert not any("e" in text for text in texts(capped))


def test_one_requests_constraints_leave_its_neighbours_alone(lm):
    model, tokenizer = lm
    plain = GenerationRequest("a house by the sea", n=4, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    constrained = GenerationRequest("a cat on a sofa", n=4, max_new_tokens=20, temperature=1.0, seed=3,
                                    avoid=("surrealism", "illumination"), prefer=load_vocab().style_families["3d"],
                                    prefer_bias=3.0, min_new_tokens=6, stop=("\n",))
    alone = [texts(result) for result in generate(model, tokenizer, [plain]) + generate(model, tokenizer,
                                                                                         [constrained])]
    together = [texts(result) for result in generate(model, tokenizer, [constrained, plain])]
    # Both ways round: the plain request's nucleus (top_p 0.9) does not move the other's draws either.
    assert together == alone[::-1]
    assert [texts(result) for result in generate(model, tokenizer, [plain, constrained])] == alone
    # ... while the constraints do change their own request's outputs.
    unconstrained = GenerationRequest("a cat on a sofa", n=4, max_new_tokens=20, temperature=1.0, seed=3,
                                      stop=("\n",))
    assert texts(generate(model, tokenizer, [unconstrained])[0]) != alone[1]


def test_streaming_honours_the_same_constraints(lm):
    model, tokenizer = lm
    request = GenerationRequest("a cat on a sofa", n=3, max_new_tokens=16, temperature=1.0, seed=4,
                                avoid=("surrealism",), prefer=("volumetric lighting",), prefer_bias=3.0,
                                min_new_tokens=4, stop=("\n",))
    expected = generate(model, tokenizer, [request])[0].completions
    deltas = list(stream(model, tokenizer, request))
    for i, completion in enumerate(expected):
        assert "".join(d.text for d in deltas if d.index == i) == completion.text


def test_no_repeat_ngram_bans_the_token_that_would_repeat_a_generated_ngram():
    # Token 5 leads, then 2, then 4. Row 0 bans repeated bigrams of its generated tokens.
    scores = torch.log(torch.tensor([[0.01, 0.02, 0.3, 0.01, 0.2, 0.46]] * 2))
    rows = [_Row(0, 0, 0.0, 1.0, 9, no_repeat_ngram_size=2), _Row(1, 0, 0.0, 1.0, 9)]
    sampler = RowSampler(rows, prompt_len=2, eos_token_id=0, device=torch.device("cpu"))
    # The prompt (5, 5) never counts: the first generated 5 is allowed.
    assert sampler(torch.tensor([[5, 5], [5, 5]]), scores).argmax(dim=-1).tolist() == [5, 5]
    # Generated 5, 5: a second (5, 5) is banned for row 0 -> 2; row 1 is unconstrained.
    assert sampler(torch.tensor([[5, 5, 5, 5]] * 2), scores).argmax(dim=-1).tolist() == [2, 5]
    # Generated 5, 2, 5: (5, 2) is taken, (5, 5) is not -> 5.
    assert sampler(torch.tensor([[5, 5, 5, 2, 5]] * 2), scores).argmax(dim=-1).tolist() == [5, 5]
    # Generated 5, 5, 2, 5: both (5, 5) and (5, 2) are taken -> 4.
    assert sampler(torch.tensor([[5, 5, 5, 5, 2, 5]] * 2), scores).argmax(dim=-1).tolist() == [4, 5]


def test_repetition_penalty_lowers_only_the_tokens_already_generated():
    # Logits: token 2 at 2.0 leads token 4 at 1.8; a generated 2 divides its logit by 1.5 -> 1.33 < 1.8.
    scores = torch.tensor([[0.0, -1.0, 2.0, -3.0, 1.8]] * 2)
    rows = [_Row(0, 0, 0.0, 1.0, 9, repetition_penalty=1.5), _Row(1, 0, 0.0, 1.0, 9)]
    sampler = RowSampler(rows, prompt_len=1, eos_token_id=0, device=torch.device("cpu"))
    assert sampler(torch.tensor([[2], [2]]), scores).argmax(dim=-1).tolist() == [2, 2]  # a prompt's 2 is free
    assert sampler(torch.tensor([[2, 2], [2, 2]]), scores).argmax(dim=-1).tolist() == [4, 2]
    # A negative logit is multiplied: token 3 generated, it only falls further behind.
    assert sampler(torch.tensor([[2, 3], [2, 3]]), scores).argmax(dim=-1).tolist() == [2, 2]


def word_trigrams_repeat(text: str) -> bool:
    words = text.split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(grams) != len(set(grams))


def test_repetition_controls_stop_a_model_looping(lm):
    """The tiny model's greedy outputs loop ("sofa sofa sofa ..."); with no_repeat_ngram_size=3 no token trigram
    recurs."""
    model, tokenizer = lm
    requests = [GenerationRequest(p, max_new_tokens=32, temperature=0.0)
                for p in ("a cat on a sofa", "a red car", "a house by the sea")]
    free = generate(model, tokenizer, requests)
    no_repeat = [dataclasses.replace(r, no_repeat_ngram_size=3) for r in requests]
    assert sum(word_trigrams_repeat(r.completions[0].text) for r in free) >= 2
    # The token ids themselves: decoding and encoding again need not give the same ids back.
    outputs, _ = _run_generate(model, tokenizer, no_repeat, _expand(no_repeat))
    for row in outputs.tolist():
        ids = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
        assert len(ids) >= 16 and len(grams) == len(set(grams)), tokenizer.decode(ids)
