"""Token lookup on real CLIP tokenisation (the BPE vocabulary open_clip_torch ships)."""

from __future__ import annotations

import pytest
import torch

from attnseg.errors import TokenNotFoundError
from attnseg.prompts import content_tokens, find_word, tokenize
from attnseg.types import Prompt


def _prompt(tokenizer, text):
    t = tokenize(tokenizer, text)
    return Prompt(text=text, embeddings=torch.zeros(1, len(t.token_ids), 1), **t.fields())


def test_tokenize_clip(clip_tokenizer):
    t = tokenize(clip_tokenizer, "a photo of a man with detailed hair")
    assert len(t.token_ids) == 77
    assert t.tokens[:3] == ("<|startoftext|>", "a</w>", "photo</w>")
    assert t.length == 10  # start + 8 words + end
    assert t.special[0] and t.special[9] and t.special[-1] and not any(t.special[1:9])


def test_find_single_token_word(clip_tokenizer):
    p = _prompt(clip_tokenizer, "a photo of a man with detailed hair")
    span = find_word(p, "hair")
    assert span.indices == (8,)  # the hair paper's example: token 8
    assert p.text[span.start : span.end] == "hair"
    assert find_word(p, "HAIR").indices == (8,)


def test_multi_token_word_and_phrase(clip_tokenizer):
    p = _prompt(clip_tokenizer, "an Ecuadorian traffic light, grass")
    word = find_word(p, "ecuadorian")
    assert len(word.indices) == 3 and word.indices == (2, 3, 4)  # ecu + ad + orian
    phrase = find_word(p, "traffic light")
    assert phrase.indices == (5, 6)
    assert find_word(p, "grass").indices == (8,)  # after the comma token


def test_missing_and_truncated_words(clip_tokenizer):
    p = _prompt(clip_tokenizer, "a cat on a sofa")
    with pytest.raises(TokenNotFoundError, match="'dog' is not in the prompt"):
        find_word(p, "dog")
    with pytest.raises(TokenNotFoundError):
        find_word(p, "ca")  # whole words only
    long = " ".join(["cat"] * 80) + " zebra"
    with pytest.raises(TokenNotFoundError, match="cut off"):
        find_word(_prompt(clip_tokenizer, long), "zebra")


def test_content_tokens(clip_tokenizer):
    p = _prompt(clip_tokenizer, "a photo of a cat, the grass and a wall")
    words = [p.tokens[i] for i in content_tokens(p)]
    assert words == ["cat</w>", "grass</w>", "wall</w>"]
