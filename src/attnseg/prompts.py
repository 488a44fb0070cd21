"""Prompts and token lookup: which token positions a word or phrase of a prompt occupies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from attnseg.errors import ConfigError, TokenNotFoundError
from attnseg.types import Prompt, TokenSpan

__all__ = [
    "STOP_WORDS", "Tokenized", "check_prompt_length", "content_tokens", "find_word", "tokenize", "unknown_words",
    "words_fitting", "words_within",
]

# Skipped as "content" (GoCA's reference skips these, plus punctuation and special tokens).
STOP_WORDS = frozenset({"a", "an", "the", "and", "of", "with", "in", "on", "at", "to", "photo", "picture", "image"})
_PUNCT = re.compile(r"^\W+$")


@dataclass(frozen=True)
class Tokenized:
    """Tokenizer output in the form :class:`~attnseg.types.Prompt` keeps."""

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]
    special: tuple[bool, ...]
    length: int

    def fields(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids, "tokens": self.tokens, "offsets": self.offsets,
            "special": self.special, "length": self.length,
        }


def tokenize(tokenizer: Any, text: str, max_length: int | None = None) -> Tokenized:
    """Tokenise ``text`` padded to the tokenizer's length limit, with character offsets per token.

    Works with Hugging Face tokenizers that return offsets (CLIP, T5 fast tokenizers) and with
    tokenizers that provide ``encode_with_offsets(text, max_length)`` (attnseg's word-level toy tokenizer).

    Special tokens (start, end, padding; T5 has no start token and ends with ``</s>``) are flagged in
    ``special`` and get the offset ``(0, 0)``, so no word lookup ever returns them. A word that the tokenizer
    splits into several pieces (BPE, sentencepiece) keeps one offset per piece, so :func:`find_word` maps it to
    all of them.
    """
    if hasattr(tokenizer, "encode_with_offsets"):
        return tokenizer.encode_with_offsets(text, max_length)
    max_length = max_length or int(tokenizer.model_max_length)
    enc = tokenizer(
        text, padding="max_length", max_length=max_length, truncation=True, return_offsets_mapping=True
    )
    ids = tuple(int(i) for i in enc["input_ids"])
    specials = set(tokenizer.all_special_ids)
    special = tuple(i in specials for i in ids)
    offsets = tuple(
        (0, 0) if s else (int(a), int(b)) for (a, b), s in zip(enc["offset_mapping"], special, strict=True)
    )
    mask = enc.get("attention_mask")
    if mask is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        length = int(sum(mask))
    else:  # CLIP pads with the end token: count up to and including the first end token
        eos = tokenizer.eos_token_id
        length = ids.index(eos) + 1 if eos in ids else len(ids)
    return Tokenized(ids, tuple(tokenizer.convert_ids_to_tokens(list(ids))), offsets, special, length)


def check_prompt_length(tokenizer: Any, text: str, max_length: int, what: str = "the text encoder") -> int:
    """The number of tokens ``text`` makes (special tokens included), or a one-line error when it exceeds
    ``max_length`` (instead of silent truncation, which would drop the words at the end).

    Raises:
        ConfigError: the prompt is longer than ``max_length`` tokens.
    """
    try:
        count = len(tokenizer(text, truncation=False)["input_ids"])
    except (TypeError, KeyError):  # tokenizers without the Hugging Face call signature: nothing to check here
        return 0
    if count > max_length:
        raise ConfigError(
            f"the prompt has {count} tokens but {what} takes at most {max_length}; shorten the prompt "
            "(or list fewer classes)"
        )
    return count


def _word_spans(text: str, word: str) -> list[tuple[int, int]]:
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in word.split()) + r"(?!\w)"
    return [(m.start(), m.end()) for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def find_word(prompt: Prompt, word: str, *, occurrence: int = 0) -> TokenSpan:
    """Token positions of ``word`` (a word or multi-word phrase) in ``prompt``.

    Matching is case-insensitive on whole words of the prompt text; every token whose character span
    overlaps the word's span belongs to it (so a word split into several sub-tokens maps to all of
    them, to be averaged by the caller).

    Raises:
        TokenNotFoundError: the word is not in the prompt, or the tokenizer's length limit cut it off.
    """
    spans = _word_spans(prompt.text, word.strip())
    if not spans:
        raise TokenNotFoundError(f"{word!r} is not in the prompt {prompt.text!r}")
    if occurrence >= len(spans):
        raise TokenNotFoundError(f"{word!r} occurs {len(spans)} time(s) in the prompt, not {occurrence + 1}")
    start, end = spans[occurrence]
    indices = tuple(
        i
        for i, ((a, b), s) in enumerate(zip(prompt.offsets, prompt.special, strict=True))
        if not s and a < end and b > start and not _is_marker(prompt.tokens[i])
    )
    if not indices:
        raise TokenNotFoundError(
            f"{word!r} was cut off: the prompt is longer than the tokenizer's limit of {len(prompt.tokens)} tokens"
        )
    return TokenSpan(text=word, start=start, end=end, indices=indices)


def words_within(prompt: Prompt | Tokenized, words: Any, *, text: str | None = None) -> list[bool]:
    """Per word (first occurrence in the prompt's text): True when all of it lies within the tokens the tokenizer
    kept.

    A word the tokenizer's length limit cut off, entirely or in part, gives False; so does a word not in the text.
    ``prompt`` is an encoded :class:`~attnseg.types.Prompt`, or a :class:`Tokenized` with its ``text``.
    """
    text = prompt.text if text is None else text  # type: ignore[union-attr]
    kept = [b for i, ((_, b), s) in enumerate(zip(prompt.offsets, prompt.special, strict=True))
            if not s and i < prompt.length]
    last = max(kept, default=0)
    out = []
    for word in words:
        spans = _word_spans(text, str(word).strip())
        out.append(bool(spans) and spans[0][1] <= last)
    return out


def words_fitting(tokenizer: Any, text: str, words: Any, max_length: int) -> list[bool]:
    """:func:`words_within` for ``text`` cut at ``max_length`` tokens by ``tokenizer``, without encoding it: which
    words a text encoder that takes at most ``max_length`` tokens would see (for models that refuse longer prompts,
    see :func:`check_prompt_length`)."""
    return words_within(tokenize(tokenizer, text, max_length), words, text=text)


def _whole_word(text: str, start: int, end: int) -> str:
    """The word of ``text`` that the span ``[start, end)`` lies in (a sub-word piece's whole word), lower-cased."""
    while start < end and text[start].isspace():
        start += 1
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    return text[start:end].strip().lower()


def _is_marker(token: str) -> bool:
    """A lone word-boundary piece (sentencepiece's ``"▁"``): it carries no word, though its offset may touch one."""
    return bool(token) and not token.strip("▁")


def content_tokens(prompt: Prompt) -> list[int]:
    """Positions of content tokens: not special (start/end/padding), not part of a stop word (judged on the whole
    word, so the piece ``"a"`` of ``"hippopotamus"`` stays), not punctuation, not a lone sentencepiece word
    boundary ``"▁"``."""
    out = []
    for i, ((a, b), s) in enumerate(zip(prompt.offsets, prompt.special, strict=False)):
        if s or i >= prompt.length or _is_marker(prompt.tokens[i]):
            continue
        piece = prompt.text[a:b].strip().lower()  # sentencepiece offsets may include the leading space
        if _whole_word(prompt.text, a, b) in STOP_WORDS or _PUNCT.match(piece or ","):
            continue
        out.append(i)
    return out


_WORD_RUN = re.compile(r"\w+")


def _piece_ids(tokenizer: Any, word: str) -> tuple[list[int], int | None]:
    """Token ids of ``word`` without special tokens, and the tokenizer's unknown-token id (None: it has none)."""
    if hasattr(tokenizer, "unk_id") and callable(tokenizer):  # attnseg's word-level toy tokenizer
        enc = tokenizer(word)
        return [i for i, s in zip(enc.ids, enc.special, strict=True) if not s], int(tokenizer.unk_id)
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    return [int(i) for i in ids], (int(unk) if unk is not None else None)


def unknown_words(tokenizer: Any, phrases: Any) -> dict[str, tuple[str, ...]]:
    """The phrases (class names, targets) that hold a word the tokenizer cannot represent.

    A word (a run of letters and digits) is unrepresentable when every token it maps to is the tokenizer's
    unknown token: with attnseg's word-level toy tokenizer a word outside its vocabulary; with CLIP's byte-level
    BPE never; with T5's sentencepiece e.g. characters outside its vocabulary.

    Args:
        tokenizer: a ``transformers`` tokenizer or a :class:`~attnseg.toyworld.tokenizer.WordTokenizer`.
        phrases: the phrases to check (strings).

    Returns:
        ``{phrase: (unknown words...)}`` for the phrases with at least one unknown word, in the given order.

    Example:
        >>> from attnseg.toyworld.tokenizer import WordTokenizer
        >>> unknown_words(WordTokenizer(["red", "circle"], max_length=8), ["red circle", "giraffe"])
        {'giraffe': ('giraffe',)}
    """
    out: dict[str, tuple[str, ...]] = {}
    for phrase in phrases:
        bad = []
        for word in _WORD_RUN.findall(str(phrase)):
            ids, unk = _piece_ids(tokenizer, word)
            if not ids or (unk is not None and all(i == unk for i in ids)):
                bad.append(word)
        if bad:
            out[str(phrase)] = tuple(bad)
    return out
