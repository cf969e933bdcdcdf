"""Tokenizers trained locally on prompt text, in the formats the real checkpoints use.

Nothing can be downloaded here, so every tiny model gets a small tokenizer of its real family:
byte-level BPE for BLOOM, CLIP's BPE with `</w>` word ends, and BERT WordPiece for BLIP's text decoder.
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Iterator, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import BertTokenizer, CLIPTokenizer, PreTrainedTokenizerFast

from bp_ray.models.bpe import build_vocab, count_words, learn_merges

BLOOM_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
CLIP_MAX_LENGTH = 77
"""Token window of CLIP text encoders (SD and the scorers truncate here)."""
_WORD_END = "</w>"
_CONTINUES = "##"

# CLIP's own pre-tokenizer pattern (openai/CLIP simple_tokenizer), so words split as in the real one.
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def filler_words(taken: set[str], spell: str = "{}") -> Iterator[str]:
    """Pseudo-words `aa`, `ab`, ... `zz`, `aaa`, ... spelt by `spell`, skipping those in `taken`.

    Prompt text holds a few thousand merges, the real vocabularies tens or hundreds of thousands of tokens: the
    rest are filled with these so that every id a real-size model can sample decodes to some text."""
    for length in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            word = spell.format("".join(letters))
            if word not in taken:
                yield word


def pad_vocab(vocab: dict[str, int], size: int, spell: str = "{}") -> dict[str, int]:
    """`vocab` extended with filler words (ids after its own) to `size` tokens."""
    padded = dict(vocab)
    for word in itertools.islice(filler_words(set(vocab), spell), max(size - len(vocab), 0)):
        padded[word] = len(padded)
    return padded


def train_bloom_tokenizer(texts: Sequence[str], vocab_size: int, model_max_length: int = 2048,
                          pad_to: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE with BLOOM's special tokens (<unk>=0, <s>=1, </s>=2, <pad>=3), left padding; `pad_to`
    fills the vocabulary with filler words up to that many tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BLOOM_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if pad_to:
        state = json.loads(tok.to_str())
        state["model"]["vocab"] = pad_vocab(state["model"]["vocab"], pad_to, "\u0120{}")  # Ġ: a leading space
        tok = Tokenizer.from_str(json.dumps(state))
    # Left padding: batched generation appends new tokens on the right of every row.
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="left", model_max_length=model_max_length)


def train_clip_tokenizer(texts: Sequence[str], vocab_size: int, pad_to: int = 0) -> CLIPTokenizer:
    """CLIP-style BPE (lower-cased, byte-level alphabet, `</w>` word ends), 77-token window, same for same texts;
    `pad_to` fills the vocabulary with filler words up to that many tokens."""
    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(_CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])

    def split(text: str) -> list[str]:
        return [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]

    words = count_words(texts, split, lambda word: (*word[:-1], word[-1] + _WORD_END))
    ends = {word[-1] for word in words}
    base = len(CLIP_SPECIALS) + len(pre_tokenizers.ByteLevel.alphabet()) + len(ends)
    merges = learn_merges(words, max(vocab_size - base, 0))
    vocab, merges = build_vocab(CLIP_SPECIALS, [*pre_tokenizers.ByteLevel.alphabet(), *ends], merges, vocab_size)
    vocab = pad_vocab(vocab, pad_to, "{}" + _WORD_END)
    # Passing vocab/merges directly: CLIPTokenizer(vocab_file=...) can silently build a 2-token vocab.
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", model_max_length=CLIP_MAX_LENGTH)


def train_bert_tokenizer(texts: Sequence[str], vocab_size: int, pad_to: int = 0) -> BertTokenizer:
    """Lower-cased WordPiece with BLIP's decoder start token [DEC], same for same texts; `pad_to` fills the
    vocabulary with filler words up to that many tokens."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    def split(text: str) -> list[str]:
        return [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]

    def join(left: str, right: str) -> str:
        return left + right.removeprefix(_CONTINUES)

    words = count_words(texts, split, lambda word: (word[0], *(_CONTINUES + c for c in word[1:])))
    alphabet = {symbol for word in words for symbol in word}
    merges = learn_merges(words, max(vocab_size - len(BERT_SPECIALS) - len(alphabet), 0), join)
    vocab, _ = build_vocab(BERT_SPECIALS, alphabet, merges, vocab_size, join)
    vocab = pad_vocab(vocab, pad_to)
    return BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=512)
