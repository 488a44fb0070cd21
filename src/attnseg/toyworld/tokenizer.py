"""A word-level tokenizer for toy-world captions, with character offsets.

One word (or punctuation mark) is one token, so a word of a prompt maps to exactly one token position;
the offsets let attnseg find it the same way it does for sub-word tokenizers.

Example:
    >>> tok = WordTokenizer(["a", "red", "circle"], max_length=8)
    >>> enc = tok("a red circle")
    >>> enc.tokens[:5], enc.offsets[2], enc.length
    (('<sos>', 'a', 'red', 'circle', '<eos>'), (2, 5), 5)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SPECIAL_TOKENS", "Encoding", "WordTokenizer"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<sos>", "<unk>", "<eos>")
"""Special tokens, ids 0..3 in this order. (``<eos>`` is deliberately not id 2: transformers' CLIP text model
treats ``eos_token_id == 2`` as a legacy config and pools at the largest id instead.)"""

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]", re.IGNORECASE)


@dataclass(frozen=True)
class Encoding:
    """A tokenised text, padded to the tokenizer's ``max_length``.

    Attributes:
        ids: ``(T,)`` token ids.
        tokens: ``T`` token strings (``"<unk>"`` for out-of-vocabulary words).
        offsets: per token the ``(start, end)`` character span in the text; ``(0, 0)`` for special tokens.
        special: per token True for ``<sos>``, ``<eos>`` and ``<pad>``.
        length: number of non-padding tokens (``<sos>`` and ``<eos>`` included).
        truncated: True when words were dropped to fit ``max_length``.
    """

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]
    special: tuple[bool, ...]
    length: int
    truncated: bool


class WordTokenizer:
    """Lower-cases, splits into words and punctuation, maps to ids, adds ``<sos>``/``<eos>`` and pads.

    Args:
        words: the vocabulary words (special tokens are prepended; duplicates ignored).
        max_length: fixed sequence length ``T``, ``<sos>`` and ``<eos>`` included (>= 2).
        start_token: begin every sequence with ``<sos>`` (CLIP style, default); False gives T5's layout, words
            then ``<eos>`` (T5's ``</s>``) then padding.
    """

    def __init__(self, words: Iterable[str], *, max_length: int, start_token: bool = True) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for <sos> and <eos>), got {max_length}")
        self.start_token = bool(start_token)
        vocab: list[str] = list(SPECIAL_TOKENS)
        for w in words:
            w = w.lower()
            if not _WORD.fullmatch(w):
                raise ValueError(f"vocabulary entry {w!r} is not a single word or punctuation mark")
            if w not in vocab:
                vocab.append(w)
        self.vocab: tuple[str, ...] = tuple(vocab)
        self.max_length = max_length
        self._index = {w: i for i, w in enumerate(self.vocab)}

    # -- ids of the special tokens -------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self._index["<pad>"]

    @property
    def sos_id(self) -> int:
        return self._index["<sos>"]

    @property
    def eos_id(self) -> int:
        return self._index["<eos>"]

    @property
    def unk_id(self) -> int:
        return self._index["<unk>"]

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab={len(self.vocab)}, max_length={self.max_length})"

    # -- encoding ------------------------------------------------------------------------------
    def words(self, text: str) -> list[tuple[str, int, int]]:
        """``(word, start, end)`` for every word or punctuation mark of ``text`` (lower-cased word)."""
        return [(m.group(0).lower(), m.start(), m.end()) for m in _WORD.finditer(text)]

    def __call__(self, text: str) -> Encoding:
        """Encode one text; words beyond the room left by the special tokens are dropped (``truncated`` is set)."""
        words = self.words(text)
        room = self.max_length - 1 - int(self.start_token)
        truncated = len(words) > room
        words = words[:room]
        ids = [self.sos_id] if self.start_token else []
        tokens = ["<sos>"] if self.start_token else []
        offsets = [(0, 0)] if self.start_token else []
        special = [True] if self.start_token else []
        for w, s, e in words:
            i = self._index.get(w, self.unk_id)
            ids.append(i)
            tokens.append(self.vocab[i])
            offsets.append((s, e))
            special.append(False)
        ids.append(self.eos_id)
        tokens.append("<eos>")
        offsets.append((0, 0))
        special.append(True)
        length = len(ids)
        pad = self.max_length - length
        ids += [self.pad_id] * pad
        tokens += ["<pad>"] * pad
        offsets += [(0, 0)] * pad
        special += [True] * pad
        return Encoding(tuple(ids), tuple(tokens), tuple(offsets), tuple(special), length, truncated)

    def encode_with_offsets(self, text: str, max_length: int | None = None) -> Any:
        """``text`` as an :class:`attnseg.prompts.Tokenized` (what :func:`attnseg.prompts.tokenize` returns for the
        Hugging Face tokenizers); ``max_length`` must be this tokenizer's (its sequences have a fixed length)."""
        from attnseg.prompts import Tokenized

        if max_length is not None and max_length != self.max_length:
            raise ValueError(f"this tokenizer pads to {self.max_length} tokens, not {max_length}")
        enc = self(text)
        return Tokenized(token_ids=enc.ids, tokens=enc.tokens, offsets=enc.offsets, special=enc.special,
                         length=enc.length)

    def batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts, ``(B, T)`` as nested lists (wrap with ``torch.tensor``)."""
        return [list(self(t).ids) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to a space-joined string, special tokens dropped."""
        return " ".join(self.vocab[i] for i in ids if self.vocab[i] not in SPECIAL_TOKENS)

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"vocab": list(self.vocab), "max_length": self.max_length}
        if not self.start_token:
            d["start_token"] = False
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> WordTokenizer:
        vocab = [str(w) for w in d["vocab"]]  # type: ignore[union-attr]
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocab must start with the special tokens {SPECIAL_TOKENS}")
        return cls(
            vocab[len(SPECIAL_TOKENS) :],
            max_length=int(d["max_length"]),  # type: ignore[call-overload]
            start_token=bool(d.get("start_token", True)),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        return cls.from_dict(json.loads(Path(path).read_text()))
