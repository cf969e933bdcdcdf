"""Batched generation of the endpoint (no Ray, no HTTP): per-row seeds, temperatures, lengths and stop strings in
one `generate` call, and streaming that yields the same tokens."""

from __future__ import annotations

import pytest
import torch

from bp_ray.serve.generation import GenerationRequest, RowSampler, _Row, generate, stream


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
