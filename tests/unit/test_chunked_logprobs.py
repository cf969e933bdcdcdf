"""The chunked LM head (bp_ray/train/token_logprobs.py) gives the log-probs, entropies, gradients and SFT loss of
the full (B, positions, vocab) float32 logits, while the head never sees more than `chunk` positions at once."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    BloomForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from bp_ray.train.ppo_math import entropy_from_logits, logprobs_from_logits
from bp_ray.train.ppo_rollout import (
    PolicyModel,
    Rollout,
    SeparateValueModel,
    SharedValueModel,
    response_logprobs,
)
from bp_ray.train.sft_data import IGNORE_INDEX
from bp_ray.train.token_logprobs import (
    TargetTokenLoss,
    chunk_positions,
    final_hidden_states,
    lm_inputs,
    target_token_loss,
    token_logprobs,
)

VOCAB, QUERY, RESPONSE = 97, 4, 7


def tiny_bloom() -> BloomForCausalLM:
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def rollout() -> Rollout:
    """3 rows: left-padded queries (row 1 by two columns), then RESPONSE tokens, the last row's padded after 4."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, QUERY + RESPONSE), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    mask = torch.ones(3, RESPONSE)
    mask[2, 4:] = 0
    attention_mask[2, QUERY + 4:] = 0
    return Rollout(input_ids, attention_mask, QUERY, mask, ["", "", ""])


def full_softmax(model, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, R) log-probs and entropies from every position's float32 logits, and those (B, R, V) logits."""
    logits = model(**lm_inputs(model, batch.input_ids, batch.attention_mask)).logits
    logits = logits[:, QUERY - 1:-1].float()
    return logprobs_from_logits(logits, batch.response_ids), entropy_from_logits(logits), logits


def chunked(model, batch: Rollout, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask)[:, QUERY - 1:-1]
    logprobs, entropy = token_logprobs(hidden, model.get_output_embeddings(), batch.response_ids, chunk,
                                       with_entropy=True)
    return logprobs, entropy


@pytest.mark.parametrize("build", [tiny_bloom, tiny_llama])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100, 0])  # 2 and 3 do not divide R = 7; 0 is the default size
def test_chunked_logprobs_and_entropy_equal_the_full_softmax(build, chunk):
    model, batch = build(), rollout()
    with torch.no_grad():
        logprobs, entropy = chunked(model, batch, chunk)
        want_logprobs, want_entropy, _ = full_softmax(model, batch)
    assert logprobs.shape == entropy.shape == (3, RESPONSE) and logprobs.dtype == torch.float32
    assert torch.allclose(logprobs, want_logprobs, atol=1e-5)
    assert torch.allclose(entropy, want_entropy, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(response_logprobs(model, batch), want_logprobs, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_gradients_through_the_checkpointed_chunks_equal_the_full_ones(chunk):
    model, batch = tiny_bloom(), rollout()
    weights = torch.linspace(-1.0, 1.0, 3 * RESPONSE).reshape(3, RESPONSE)  # every position counts differently

    def grads(logprobs: torch.Tensor, entropy: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        ((logprobs * weights).sum() + 0.3 * (entropy * weights).sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    want = grads(*full_softmax(model, batch)[:2])
    got = grads(*chunked(model, batch, chunk))
    for expected, actual in zip(want, got, strict=True):
        assert torch.allclose(actual, expected, atol=1e-5)


def test_the_lm_head_never_sees_more_than_a_chunk_of_positions_forward_or_backward():
    model, batch = tiny_bloom(), rollout()
    shapes: list[tuple[int, ...]] = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    logprobs, entropy = chunked(model, batch, chunk=3)
    assert shapes == [(3, 3, VOCAB), (3, 3, VOCAB), (3, 1, VOCAB)]  # R = 7 positions -> 3 + 3 + 1
    (logprobs.sum() + entropy.sum()).backward()
    # The backward recomputes each chunk (a forward of the head) rather than keeping its logits.
    assert len(shapes) == 6 and all(shape[1] <= 3 for shape in shapes)
    # No (B, R, V) logits anywhere: no head output ever had all R positions.
    assert all(shape[1] < RESPONSE for shape in shapes)


def test_without_grad_no_chunk_is_checkpointed_or_recomputed():
    model, batch = tiny_bloom(), rollout()
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: calls.append(out.requires_grad))
    with torch.no_grad():
        response_logprobs(model, batch)
    assert calls and not any(calls)


def test_the_default_chunk_keeps_a_chunk_of_bloom_logits_under_128_mib():
    # 8 rows x 250,880 tokens x 4 bytes = 8,028,160 bytes a position; 128 MiB / that = 16.7 -> 16 positions
    assert chunk_positions(8, 250_880) == 16
    assert chunk_positions(64, 250_880) == 2
    assert chunk_positions(1024, 250_880) == 1  # never fewer than one position


def sft_batch() -> dict[str, torch.Tensor]:
    """Right-padded SFT rows: prompt labels IGNORE_INDEX, then the target; row 1 is shorter (padding at the end)."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("chunk", [1, 4, 0])
def test_the_sft_loss_equals_the_models_own_loss_and_its_gradient(chunk):
    model, batch = tiny_bloom(), sft_batch()
    model.zero_grad()
    want = model(**batch).loss
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = TargetTokenLoss(model, chunk)(**batch)
    got.backward()
    assert torch.allclose(got, want, atol=1e-6)
    for expected, actual in zip(want_grads, [p.grad for p in model.parameters()], strict=True):
        assert torch.allclose(actual, expected, atol=1e-5)


def test_the_sft_loss_sends_only_target_positions_through_the_head_in_chunks():
    model, batch = tiny_bloom(), sft_batch()
    shapes: list[tuple[int, ...]] = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        target_token_loss(model, **batch, chunk=4)
    # Counted labels: row 0 columns 5..11 (7), row 1 columns 3..8 (6) -> 13 positions as one row, 4 at a time
    assert shapes == [(1, 4, VOCAB)] * 3 + [(1, 1, VOCAB)]


def test_each_actor_critic_module_gives_the_full_forwards_logprobs_entropy_and_values():
    policy, batch = tiny_bloom(), rollout()
    want_logprobs, want_entropy, _ = full_softmax(policy, batch)
    torch.manual_seed(3)
    critic = BloomForTokenClassification(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                                                     num_labels=1)).eval()
    want_values = critic(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, QUERY - 1:-1, 0]
    shared = SharedValueModel(policy)
    torch.nn.init.normal_(shared.value_head.weight)  # not the zero start, so the columns it reads show
    hidden = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    want_shared = shared.value_head(hidden.hidden_states[-1])[:, QUERY - 1:-1, 0]
    args = (batch.input_ids, batch.attention_mask, batch.response_ids)
    with torch.no_grad():
        for module, values in [(PolicyModel(policy), None), (shared, want_shared),
                               (SeparateValueModel(policy, critic), want_values)]:
            logprobs, entropy, got_values = module(*args, with_entropy=True)
            assert torch.allclose(logprobs, want_logprobs, atol=1e-5)
            assert torch.allclose(entropy, want_entropy, atol=1e-5)
            assert (got_values is None) if values is None else torch.allclose(got_values, values, atol=1e-6)
            assert module(*args)[1] is None  # entropy only when asked for


def test_a_model_that_scales_its_logits_is_refused():
    model = tiny_bloom()
    model.config.final_logit_softcapping = 30.0  # as Gemma 2: logits = cap * tanh(head / cap)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        response_logprobs(model, rollout())
