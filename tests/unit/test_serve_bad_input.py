"""The endpoint's bad-input rules that need no server: prompts with no text for the model (blank, invisible, or
tokenizing to nothing; the strings of special tokens are text), and the limits on chats and stop strings.

Generation runs on a random two-layer BLOOM built here in milliseconds, with a byte-level BPE trained on a few
words (no zoo, no Ray)."""

from __future__ import annotations

import pydantic
import pytest
import torch
from tokenizers import normalizers, processors
from transformers import BloomConfig, BloomForCausalLM

from bp_ray.config import PipelineConfig
from bp_ray.data.policy_format import TEXT_ONLY, encode_prompts, format_prompt, leading_tokens
from bp_ray.models.tokenizers import train_bloom_tokenizer
from bp_ray.serve.errors import ApiError, Limits
from bp_ray.serve.generation import GenerationRequest, generate, refusals, request_ids, stream
from bp_ray.serve.schemas import BeautifyRequest, ChatCompletionRequest, ChatMessage, CompletionRequest


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tokenizer = train_bloom_tokenizer(["a cat on a sofa", "a red car by the sea", "a house at night"] * 4, 300)
    model = BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=16, n_layer=2, n_head=2,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id)).eval()
    return model, tokenizer


# --- the request schema: nothing visible is a blank prompt -------------------------------------------------------

@pytest.mark.parametrize(("prompt", "message"), [
    ("", "must not be empty or whitespace only"),
    (" \t\n\u3000", "must not be empty or whitespace only"),  # U+3000: the ideographic space
    ("\u200b", "(U+200B at character 0 is an invisible format character)"),  # zero-width space
    (" \ufeff\u200d", "(U+FEFF at character 1 is an invisible format character)"),  # BOM, zero-width joiner
    ("\u00ad", "U+00AD at character 0"),  # soft hyphen
])
def test_a_prompt_with_nothing_visible_is_blank(prompt, message):
    for model, body in ((BeautifyRequest, {"prompt": prompt}),
                        (CompletionRequest, {"model": "m", "prompt": prompt}),
                        (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": prompt}]})):
        with pytest.raises(pydantic.ValidationError, match="must not be empty or whitespace only") as caught:
            model.model_validate(body)
        assert message in caught.value.errors()[0]["msg"]


def test_invisible_characters_inside_real_text_are_kept():
    for prompt in ("a\u200bcat", "a family 👩\u200d👩\u200d👧 at the beach", "\ufeffa cat"):
        assert BeautifyRequest.model_validate({"prompt": prompt}).prompt == prompt


# --- the generator: a prompt must give the model text tokens ------------------------------------------------------

def test_special_token_strings_are_text_not_control_tokens(lm):
    model, tokenizer = lm
    # "</s>" inside a prompt used to reach the model as its end-of-text mark; it is the four characters it shows.
    ids = request_ids(tokenizer, GenerationRequest("a cat </s> on a <pad> sofa"))
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids) == "a cat </s> on a <pad> sofa"
    alone = generate(model, tokenizer, [GenerationRequest("</s>", n=2, max_new_tokens=6, temperature=1.0, seed=3)])
    templated = GenerationRequest("Rewrite: <pad> </s>\nAnswer:", max_new_tokens=6, prompt="<pad> </s>")
    both = generate(model, tokenizer, [GenerationRequest("</s>", n=2, max_new_tokens=6, temperature=1.0, seed=3),
                                       templated])
    assert all(result.refused is None for result in (*alone, *both))
    assert len(both[1].completions) == 1
    assert [c.text for c in both[0].completions] == [c.text for c in alone[0].completions]


def test_a_templates_own_control_tokens_stay_control_tokens_and_the_users_are_text(lm):
    """A chat-style instruction's markers reach the model as the control tokens SFT trained on; the same strings in
    the user's prompt are characters. Without markers in the instruction nothing changes."""
    model, tokenizer = lm
    instruction = "</s>Rewrite: {raw}</s>Answer:"
    prompt = "a cat </s> sofa"
    ids = encode_prompts(tokenizer, instruction, [prompt])[0]
    eos = tokenizer.eos_token_id
    assert ids[0] == eos and ids.count(eos) == 2  # the template's two, not the user's
    second = ids.index(eos, 1)
    assert tokenizer.decode(ids[1:second]) == "Rewrite: a cat </s> sofa"
    assert tokenizer.decode(ids[second + 1:]) == "Answer:"
    request = GenerationRequest(format_prompt(instruction, prompt), prompt=prompt, instruction=instruction)
    assert request_ids(tokenizer, request) == ids
    plain = "Rewrite: {raw}\nAnswer:"
    assert encode_prompts(tokenizer, plain, [prompt], keep_prompt=True)[0] == tokenizer(
        format_prompt(plain, prompt, keep_prompt=True), **TEXT_ONLY)["input_ids"]
    assert generate(model, tokenizer, [request])[0].completions


def test_a_tokenizer_that_begins_every_text_with_bos_gets_it_before_every_policy_input(lm):
    _, tokenizer = lm
    bos, plain, chat = tokenizer.bos_token_id, "Rewrite: {raw}\nAnswer:", "<s>Rewrite: {raw}</s>Answer:"
    assert leading_tokens(tokenizer) == []
    before = tokenizer.backend_tokenizer.post_processor
    # Gemma's tokenizer puts <bos> before every text, and Gemma writes nonsense without it.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                             special_tokens=[("<s>", bos)])
    try:
        assert tokenizer("a cat")["input_ids"][0] == bos
        assert leading_tokens(tokenizer) == [bos]
        assert encode_prompts(tokenizer, plain, ["a cat"])[0] == [bos, *tokenizer(
            format_prompt(plain, "a cat"), **TEXT_ONLY)["input_ids"]]
        assert encode_prompts(tokenizer, chat, ["a <s> cat"])[0].count(bos) == 1  # the template's own, once
        assert request_ids(tokenizer, GenerationRequest("a cat")) == [bos, *tokenizer("a cat", **TEXT_ONLY)[
            "input_ids"]]
    finally:
        tokenizer.backend_tokenizer.post_processor = before


def test_text_that_tokenizes_to_nothing_is_refused(lm):
    model, tokenizer = lm
    # A normalising tokenizer (as SentencePiece ones do with some characters) drops "~" here entirely.
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("~", "")
    try:
        assert tokenizer("~~", add_special_tokens=False)["input_ids"] == []
        assert refusals(tokenizer, [GenerationRequest("~~"), GenerationRequest("a ~ cat")]) == [
            "tokenizes to no text tokens for this model: send the prompt's text", None]
        deltas = list(stream(model, tokenizer, GenerationRequest("~~", n=2)))
    finally:
        tokenizer.backend_tokenizer.normalizer = None
    assert len(deltas) == 1 and deltas[0].refused and deltas[0].text == "" and deltas[0].finish_reason is None


# --- limits of a whole request ------------------------------------------------------------------------------------

def _limits(**serve) -> Limits:
    cfg = PipelineConfig()
    for key, value in serve.items():
        setattr(cfg.serve, key, value)
    return Limits(cfg)


def test_a_chat_is_bounded_in_messages_and_in_characters():
    limits = _limits(max_messages=64, max_chat_chars=1000)
    history = [ChatMessage(role="user" if i % 2 == 0 else "assistant", content="a cat") for i in range(1000)]
    with pytest.raises(ApiError) as caught:
        limits.chat(history)
    assert (caught.value.status, caught.value.param) == (400, "messages")
    assert caught.value.message == "messages has 1000 messages; the limit is 64"
    limits.chat(history[:64])  # 64 x 5 = 320 characters: within both limits
    long = [ChatMessage(role="system", content="x" * 999), ChatMessage(role="user", content=[
        {"type": "text", "text": "a "}, {"type": "text", "text": "cat"}])]
    with pytest.raises(ApiError, match="messages hold 1004 characters in all; the limit is 1000"):
        limits.chat(long)


def test_each_stop_string_is_bounded_like_a_prompt():
    limits = _limits(max_prompt_chars=10)
    limits.stop(["x" * 10] * 4)
    limits.stop(None)
    with pytest.raises(ApiError, match=r"^stop\[2\] is 11 characters long; the limit is 10$") as caught:
        limits.stop(["a", "b", "x" * 11])
    assert caught.value.param == "stop[2]"
    with pytest.raises(ApiError, match=r"^stop is 11 characters long"):
        limits.stop("x" * 11)
