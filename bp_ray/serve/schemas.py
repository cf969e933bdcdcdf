"""Request and response bodies of the endpoint: bp-ray's own /v1/beautify and /v1/render, and the subset of the
OpenAI API (completions, chat completions, models) that text clients use.

Types are strict (a number is not a string, a string is not a number) and bounds that do not depend on the
config live here, so that the OpenAPI spec states them; limits from the config (prompt length, n, max tokens)
are checked by the app, which answers 400 with the same error body.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**53 - 1
"""The largest integer a JSON number holds exactly."""
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="output i samples with seed + i; omitted: a random "
                                                             "seed, returned in the response")]
Count = Annotated[int, Field(ge=1, le=64)]
RepetitionPenalty = Annotated[float, Field(ge=1.0, le=2.0, description="above 1, tokens an output already holds "
                                           "are less likely (1: off); omitted: the server's serve.decoding")]
NgramSize = Annotated[int, Field(ge=0, le=16, description="n > 0: no n tokens in a row occur twice in an output "
                                 "(0: off); omitted: the server's serve.decoding")]
Tokens = Annotated[int, Field(ge=1, le=4096)]


NOT_BLANK = {"pattern": r"\S"}
"""Documents the blank-prompt rule in the spec; the validator below gives the error message."""


NOT_TEXT = re.compile(r"[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""Lone surrogates (valid JSON escapes, not Unicode: a tokenizer cannot encode them) and control characters other
than tab and line breaks."""


def _plain_text(text: str) -> str:
    """`text` if every character is text a tokenizer takes; the first one that is not, named, otherwise."""
    bad = NOT_TEXT.search(text)
    if bad:
        code = ord(bad.group())
        kind = "a lone surrogate" if 0xD800 <= code <= 0xDFFF else "the control character"
        raise ValueError(f"has {kind} U+{code:04X} at character {bad.start()}: send text as valid Unicode, "
                         f"without control characters other than tab and line breaks")
    return text


def _not_blank(text: str) -> str:
    _plain_text(text)
    if not text.strip():
        raise ValueError("must not be empty or whitespace only")
    # Zero-width spaces, joiners, soft hyphens and byte-order marks (Unicode's format characters) show nothing
    # either, and tokenizers that normalise text drop them: such a prompt gives the model nothing to rewrite.
    shown = [i for i, char in enumerate(text) if not char.isspace() and unicodedata.category(char) != "Cf"]
    if not shown:
        first = next(i for i, char in enumerate(text) if not char.isspace())
        raise ValueError(f"must not be empty or whitespace only (U+{ord(text[first]):04X} at character {first} "
                         "is an invisible format character)")
    return text


class _Request(BaseModel):
    # OpenAI clients send fields we have no use for (user, logit_bias, ...): ignore them rather than fail.
    model_config = ConfigDict(strict=True, extra="ignore")


class Repetition(_Request):
    """Repetition controls of every generating route (transformers' names; the openai client sends them with
    extra_body)."""

    repetition_penalty: RepetitionPenalty | None = None
    no_repeat_ngram_size: NgramSize | None = None


Style = Literal["photo", "painting", "anime", "3d"]
Detail = Literal["low", "medium", "high"]
Rank = Literal["none", "reward_model", "online"]
Phrases = Annotated[list[Annotated[str, AfterValidator(lambda text: _not_blank(text))]], Field(max_length=256)]
"""Each phrase is checked on its own, so that an error names it (keep[2])."""


class Controls(_Request):
    """What a user may ask of the rewrites beyond the prompt (the beautify route and, as extra fields, chat)."""

    keep: Phrases | None = Field(None, description="phrases every output contains verbatim (also: <keep>...</keep> "
                                                   "around text in the prompt)")
    max_prompt_tokens: Annotated[int, Field(ge=3, le=4096)] | None = Field(
        None, description="outputs fit this many tokens of the renderer's text encoder (BOS and EOS counted); "
                          "default: the encoder's window when the renderer truncates there")
    detail: Detail | None = Field(None, description="low: few added words; high: many; medium or omitted: the "
                                                    "model's own length")
    style: Style | None = Field(None, description="a vocabulary family the rewrite leans to")
    avoid: Phrases | None = Field(None, description="phrases never added; omitted: the overused keyword-soup list; "
                                                    "[]: none")
    keep_colours: bool | None = Field(None, description="true: a prompt that gives something a colour gets no "
                                                        "other colour word in its rewrites; omitted: the server's "
                                                        "serve.decoding")


class BeautifyRequest(Controls, Repetition):
    prompt: str | None = Field(None, description="the plain text-to-image prompt to beautify (required unless "
                                                 "edit_of)", json_schema_extra=NOT_BLANK)
    n: Count = 1
    max_new_tokens: Tokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    model: str | None = None
    negative_prompt: str | None = Field(None, description="returned as is, and passed unchanged to the renderer")
    rank: Rank = Field("none", description="order the n outputs by the learned reward model (text only) or by "
                                           "rendering and scoring them (online); each output then has scores")
    best_of: Count | None = Field(None, description="return the best this many of the n outputs (needs rank)")
    render: bool = Field(False, description="also render each returned output (PNG, base64)")
    edit_of: str | None = Field(None, description="id of an output this endpoint returned: `text` is the user's "
                                                  "edit of it, scored against it")
    text: str | None = Field(None, description="with edit_of: the user's edited text")

    @field_validator("prompt", "text")
    @classmethod
    def _prompt(cls, prompt: str | None) -> str | None:
        return None if prompt is None else _not_blank(prompt)

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, text: str | None) -> str | None:
        return None if text is None else _plain_text(text)


class Scores(BaseModel):
    reward: float
    pickscore: float | None = None
    """Not from a style reward model (rm.target=style), which scores style only."""
    aesthetic: float | None = None
    style: float | None = None
    """Only from a style reward model: how much the text reads like an SD prompt, 0 to 1."""
    relevance: float | None = None
    """Only when rendered (rank=online)."""


class BeautifyOutput(BaseModel):
    id: str
    """Stable id of this output (same model, prompt and text: same id); pass it as edit_of to score an edit."""
    index: int
    text: str
    finish_reason: Literal["stop", "length", "edit"]
    tokens: int
    encoder_tokens: int
    """Length in the renderer's text-encoder tokens, BOS and EOS included."""
    scores: Scores | None = None
    image_png_base64: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class BeautifyResponse(BaseModel):
    model: str
    prompt: str
    seed: int
    outputs: list[BeautifyOutput]
    rejected: int = 0
    """Generated outputs not returned: they could not keep a protected span within the token budget."""
    negative_prompt: str | None = None
    original: BeautifyOutput | None = None
    """With edit_of: the output the edit was made of, scored the same way."""
    usage: Usage
    latency_ms: float


class RenderRequest(Controls, Repetition):
    prompt: str = Field(json_schema_extra=NOT_BLANK)
    seed: Seed | None = None
    beautify: bool = Field(True, description="false renders the prompt as given")
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_new_tokens: Tokens | None = None
    negative_prompt: str | None = Field(None, description="passed unchanged to the renderer")

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, text: str | None) -> str | None:
        return None if text is None else _plain_text(text)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: str) -> str:
        return _not_blank(prompt)


class CompletionRequest(Repetition):
    model: str
    prompt: str | list[str] = Field(description="text to continue as is (no instruction template)")
    max_tokens: Tokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Count = 1
    stream: bool = False
    seed: Seed | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings that end an output")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: str | list[str]) -> str | list[str]:
        for text in [prompt] if isinstance(prompt, str) else prompt or [""]:
            _not_blank(text)
        return prompt

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        for text in [stop] if isinstance(stop, str) else stop or []:
            _plain_text(text)
        return stop


class TextPart(_Request):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, text: str) -> str:
        return _plain_text(text)


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _content(cls, content: str | list[TextPart]) -> str | list[TextPart]:
        return _plain_text(content) if isinstance(content, str) else content

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(Controls, Repetition):
    model: str
    messages: list[ChatMessage] = Field(min_length=1, description="the last user message is the prompt to "
                                                                  "beautify")
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Count = 1
    stream: bool = False
    seed: Seed | None = None

    @field_validator("messages")
    @classmethod
    def _has_prompt(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        users = [m for m in messages if m.role == "user"]
        if not users:
            raise ValueError("needs a message with role 'user' (the prompt to beautify)")
        _not_blank(users[-1].text())
        return messages


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDeltaChoice(BaseModel):
    index: int
    delta: AssistantMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatDeltaChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bp-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class BatchStats(BaseModel):
    """Generation batches this replica ran since it started: mean rows per batch shows how well batching fills."""

    batches: int = 0
    rows: int = 0
    generate_s: float = 0.0
    stream_batches: int = 0
    """Streamed requests are batched with each other: batches of them, and the output rows they held."""
    stream_rows: int = 0


class GeneratorInfo(BaseModel):
    checkpoint: str
    replica: str
    pid: int
    batching: BatchStats


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    pid: int
    """The ingress replica's process."""
    render: bool
    generator: GeneratorInfo


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error body, so the `openai` client raises with our message."""

    error: ErrorDetail
