"""Image loading: conversions of every common kind, clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.errors import ImageError
from attnseg.io.images import expand_image_paths, load_image


def test_conversions(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((10, 12), 77, np.uint8)).save(gray)
    im = load_image(gray)
    assert im.mode == "RGB" and im.size == (12, 10) and im.getpixel((0, 0)) == (77, 77, 77)

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, ..., 3] = 255  # top half opaque red, bottom transparent -> white
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    im = load_image(path)
    assert im.getpixel((0, 0)) == (255, 0, 0) and im.getpixel((0, 3)) == (255, 255, 255)

    deep = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535], [32768, 65535]], np.uint16)).save(deep)
    im = load_image(deep)
    assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((1, 0)) == (255, 255, 255)
    assert im.getpixel((0, 1))[0] == 128  # rescaled, not clipped to 255

    assert load_image(np.zeros((5, 6, 3), np.uint8)).size == (6, 5)
    assert load_image(torch.ones(3, 4, 5)).getpixel((0, 0)) == (255, 255, 255)


def test_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="not an image file"):
        load_image(text)
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="at least 16 px"):
        load_image(np.zeros((8, 8, 3), np.uint8), min_size=16)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((2, 3, 5), np.uint8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no images"):
        expand_image_paths([tmp_path / "empty"])


def test_expand_folder(tmp_path):
    for name in ("b.png", "a.jpg", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in expand_image_paths([tmp_path])] == ["a.jpg", "b.png"]
