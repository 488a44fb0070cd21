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


# ---- photographs as they arrive ---------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways: pixels 40 wide x 20 high with orientation 6 (rotate 90 clockwise to
    view) comes out 20 wide x 40 high, and the stored top-left corner is the viewed top-right one."""
    from attnseg.io.images import read_image

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:5, :5] = (255, 0, 0)  # stored top-left: red
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.png"
    Image.fromarray(arr).save(path, exif=exif)
    decoded = read_image(path)
    assert decoded.size == (40, 20) and decoded.image.size == (20, 40) and decoded.orientation == 6
    assert decoded.image.getpixel((19, 0)) == (255, 0, 0) and decoded.image.getpixel((0, 0)) == (0, 0, 0)


def test_16bit_holding_12bit_data_is_scaled_by_its_own_depth(tmp_path):
    from attnseg.io.images import read_image, significant_bits
    from tests.imaging import write_png16

    assert [significant_bits(np.array([v], np.uint16)) for v in (0, 255, 256, 1023, 4095, 4096, 65535)] == \
        [8, 8, 10, 10, 12, 14, 16]
    gray = np.array([[0, 4095], [2048, 1024]], np.uint16)  # 12-bit samples in a 16-bit file
    Image.fromarray(gray).save(tmp_path / "gray12.png")
    im = read_image(tmp_path / "gray12.png")
    assert im.bit_depth == 12
    assert im.image.getpixel((1, 0)) == (255, 255, 255)  # 4095 is white, not 4095/65535 = 6% grey
    assert im.image.getpixel((0, 1))[0] == round(2048 / 4095 * 255)

    rng = np.random.default_rng(0)
    colour = rng.integers(0, 4096, (6, 9, 3)).astype(np.uint16)
    colour[0, 0] = 4095
    for sub in (False, True):  # Pillow decodes only the high byte of 16-bit colour; both bytes must count
        write_png16(tmp_path / "rgb12.png", colour, sub_filter=sub)
        im = read_image(tmp_path / "rgb12.png")
        expected = np.floor(colour / 4095 * 255 + 0.5).astype(np.uint8)
        assert im.bit_depth == 12
        np.testing.assert_array_equal(np.asarray(im.image), expected)
        assert np.asarray(im.image).mean() > 100  # not "almost black"

    rgba = np.concatenate([colour, np.full((6, 9, 1), 65535, np.uint16)], axis=-1)
    rgba[1, 1, 3] = 0  # one transparent pixel: white
    write_png16(tmp_path / "rgba.png", rgba)
    im = np.asarray(read_image(tmp_path / "rgba.png").image)
    assert tuple(im[1, 1]) == (255, 255, 255) and tuple(im[0, 0]) == (255, 255, 255)
    np.testing.assert_array_equal(im[2, 2], np.floor(colour[2, 2] / 4095 * 255 + 0.5))

    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "rgb12.tif", colour, compression="zlib")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "rgb12.tif").image),
                                  np.floor(colour / 4095 * 255 + 0.5).astype(np.uint8))
    # arrays follow the same rule
    np.testing.assert_array_equal(np.asarray(read_image(colour).image), np.floor(colour / 4095 * 255 + 0.5))


def test_large_jpeg_is_reduced_while_decoding(tmp_path):
    """A 4000 x 3000 JPEG with max_side 500 is decoded by the JPEG decoder at 1/4 scale (draft mode) or
    less, then reduced to 500: the full-size pixels are never decoded."""
    from attnseg.io.images import read_image

    arr = np.zeros((3000, 4000, 3), np.uint8)
    arr[:, 2000:] = 255
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, quality=80)
    del arr
    decoded_sizes = []
    real_load = Image.Image.load

    def spy(self):  # record the size the decoder produced
        out = real_load(self)
        decoded_sizes.append(self.size)
        return out

    Image.Image.load = spy  # type: ignore[method-assign]
    try:
        d = read_image(path, max_side=500)
    finally:
        Image.Image.load = real_load  # type: ignore[method-assign]
    assert d.size == (3000, 4000) and max(d.image.size) == 500 and d.reduced
    assert max(w for w, _ in decoded_sizes) <= 1000, decoded_sizes  # 4000 / 4: the decoder reduced it
    assert d.image.getpixel((10, 10))[0] < 30 and d.image.getpixel((490, 10))[0] > 225


def test_decompression_bomb_refused_from_the_header(tmp_path):
    from attnseg.io.images import read_image
    from tests.imaging import write_png_header

    path = write_png_header(tmp_path / "bomb.png", 40000, 40000)  # 1.6 gigapixels claimed in 60 bytes
    with pytest.raises(ImageError, match=r"40000x40000 px \(1600 megapixels\)|over the limit of 179 megapixels"):
        read_image(path)
    small = write_png_header(tmp_path / "wide.png", 3000, 2000)
    with pytest.raises(ImageError, match="over the limit of 5 megapixels"):
        read_image(small, max_pixels=5_000_000)


def test_damaged_file_is_an_image_error(tmp_path):
    from attnseg.io.images import read_image

    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageError, match="cannot read image"):
        read_image(cut)


def test_reducing_an_in_memory_image_leaves_it_alone():
    from attnseg.io.images import read_image

    original = Image.new("RGB", (3000, 1000), (10, 200, 30))
    d = read_image(original, max_side=600)
    assert original.size == (3000, 1000) and d.image.size == (600, 200) and d.size == (1000, 3000)
