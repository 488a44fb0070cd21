"""Placement: boxes computed by hand for odd sizes and a panorama, point maps, maps back to the original."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.errors import ConfigError
from attnseg.io.geometry import PAD_VALUE, Placement, native_size, place
from attnseg.types import SegmentationResult

# (original (H, W), model (H, W), fit) -> (source box, target box), each worked out by hand below.
CASES = [
    # panorama 2000x300 in 512x512. pad: scale min(512/2000, 512/300) = 0.256 -> 512 x round(76.8) = 77 rows,
    # top (512 - 77) // 2 = 217. crop: scale max(...) = 512/300 -> a 300x300 box, left (2000 - 300) // 2 = 850.
    (((300, 2000), (512, 512), "pad"), ((0, 0, 2000, 300), (0, 217, 512, 294))),
    (((300, 2000), (512, 512), "crop"), ((850, 0, 1150, 300), (0, 0, 512, 512))),
    (((300, 2000), (512, 512), "resize"), ((0, 0, 2000, 300), (0, 0, 512, 512))),
    # odd 17 x 33 (H x W) in 32x32. pad: scale min(32/33, 32/17) = 32/33 -> round(33 * 32/33) = 32 wide,
    # round(17 * 32/33) = round(16.48) = 16 high, top (32 - 16) // 2 = 8.
    (((17, 33), (32, 32), "pad"), ((0, 0, 33, 17), (0, 8, 32, 24))),
    # crop: scale max(32/33, 32/17) = 32/17 -> round(32 * 17/32) = 17 wide, 17 high; left (33 - 17) // 2 = 8.
    (((17, 33), (32, 32), "crop"), ((8, 0, 25, 17), (0, 0, 32, 32))),
    # tall odd 35 x 9 in 16 x 24 (H x W). pad: scale min(24/9, 16/35) = 16/35 -> round(9 * 16/35) = round(4.11) = 4
    # wide, 16 high, left (24 - 4) // 2 = 10. crop: scale max(24/9, 16/35) = 24/9 -> 9 wide, round(16 * 9/24) = 6
    # high, top (35 - 6) // 2 = 14.
    (((35, 9), (16, 24), "pad"), ((0, 0, 9, 35), (10, 0, 14, 16))),
    (((35, 9), (16, 24), "crop"), ((0, 14, 9, 20), (0, 0, 24, 16))),
]


@pytest.mark.parametrize(("args", "boxes"), CASES)
def test_boxes_by_hand(args, boxes):
    p = Placement.create(*args)
    assert (p.source, p.target) == boxes
    assert p.original == args[0] and p.model == args[1]


def test_native_size_by_hand():
    # area 512^2, aspect 2000/300: sqrt(262144 * 6.667) = 1322.0 -> 21 x 64 = 1344; sqrt(262144 / 6.667) = 198.3
    # -> 3 x 64 = 192
    assert native_size((300, 2000), (512, 512), 64) == (192, 1344)
    assert native_size((512, 512), (512, 512), 64) == (512, 512)
    assert native_size((4000, 3000), (512, 512), 8) == (592, 440)  # sqrt(262144*4/3)=591.2, sqrt(262144*3/4)=443.4
    # 10000 x 10: the short side clamps at one multiple; the long side gives way to keep the area bounded
    h, w = native_size((10, 10000), (64, 64), 8)
    assert h == 8 and w % 8 == 0 and h * w <= 1.5 * 64 * 64
    p = place((300, 2000), (512, 512), "native", multiple=64)
    assert p.model == (192, 1344) and p.source == (0, 0, 2000, 300) and p.target == (0, 0, 1344, 192)
    with pytest.raises(ConfigError, match="any aspect ratio"):
        place((300, 2000), (512, 512), "native", multiple=None)
    with pytest.raises(ConfigError, match="fit must be one of"):
        place((3, 3), (4, 4), "stretch")  # type: ignore[arg-type]


def test_points_forward_and_back():
    p = Placement.create((300, 2000), (512, 512), "pad")
    assert p.forward(0, 0) == (0, 217) and p.forward(2000, 300) == (512, 294)
    assert p.forward(1000, 150) == (256, 255.5)
    c = Placement.create((300, 2000), (512, 512), "crop")
    assert c.forward(850, 0) == (0, 0) and c.forward(1150, 300) == (512, 512)
    rng = np.random.default_rng(0)
    for pl in (p, c, Placement.create((17, 33), (32, 32), "pad"), Placement.create((35, 9), (16, 24), "crop")):
        for x, y in rng.uniform(0, 30, (5, 2)):
            assert pl.inverse(*pl.forward(x, y)) == pytest.approx((x, y))
    assert p.lossless and not c.lossless


def test_pad_excluded_from_every_segment():
    """The model input holds label 7 on the padding only; back at the original size no pixel is 7, and the
    content's labels land where the content was."""
    p = Placement.create((300, 2000), (512, 512), "pad")
    labels = torch.full((512, 512), 7, dtype=torch.long)
    labels[217:294, :256] = 1  # left half of the image
    labels[217:294, 256:] = 2  # right half
    back = p.labels_to_original(labels)
    assert back.shape == (300, 2000) and back.dtype == np.uint8
    assert 7 not in np.unique(back)
    assert (back[:, :1000] == 1).all() and (back[:, 1000:] == 2).all()
    result = p.result_to_original(SegmentationResult(labels=labels, scores=torch.rand(3, 512, 512)))
    assert result.size == (300, 2000) and result.scores.shape == (3, 300, 2000)
    assert result.meta["geometry"]["target_box"] == [0, 217, 512, 294]
    assert set(result.labels.unique().tolist()) == {1, 2}


def test_labels_back_exactly_on_small_grids():
    # original 2 x 6 in 6 x 6: pad puts the image on rows 2..3 (scale 1), so the labels come back unchanged
    p = Placement.create((2, 6), (6, 6), "pad")
    assert p.target == (0, 2, 6, 4)
    labels = np.full((6, 6), 9)
    labels[2:4] = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(p.labels_to_original(labels), np.arange(12).reshape(2, 6))
    # 4 x 4 model -> 8 x 8 original: every model pixel covers a 2 x 2 block (nearest, centres aligned)
    q = Placement.create((8, 8), (4, 4), "resize")
    small = np.arange(16).reshape(4, 4)
    np.testing.assert_array_equal(q.labels_to_original(small), np.kron(small, np.ones((2, 2), int)))
    # crop: what the model did not see takes the nearest edge's label
    c = Placement.create((2, 6), (2, 2), "crop")
    assert c.source == (2, 0, 4, 2)
    np.testing.assert_array_equal(c.labels_to_original(np.array([[1, 2], [3, 4]])),
                                  [[1, 1, 1, 2, 2, 2], [3, 3, 3, 4, 4, 4]])
    # ids of 256 and more keep their values
    big = np.array([[0, 300], [70000, 5]])
    assert q.labels_to_original(np.kron(big, np.ones((2, 2), int)))[0, 4] == 300
    assert Placement.create((2, 2), (2, 2), "resize").labels_to_original(big).tolist() == big.tolist()


def test_scores_back_bilinear():
    # a horizontal ramp stays a ramp: bilinear (half-pixel) from 4 to 8 columns
    q = Placement.create((1, 8), (1, 4), "resize")
    ramp = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    back = q.scores_to_original(ramp)[0, 0]
    expected = torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0])  # clamped at the edges
    torch.testing.assert_close(back, expected)
    masks = torch.tensor([[[True, False, False, True]]])
    assert q.scores_to_original(masks).dtype == torch.bool


def test_apply_letterboxes_and_handles_reduced_images():
    red = Image.new("RGB", (2000, 300), (255, 0, 0))
    p = Placement.create((300, 2000), (512, 512), "pad")
    for image in (red, red.resize((1000, 150))):  # a copy reduced while decoding maps to the same boxes
        shown = p.apply(image)
        assert shown.size == (512, 512)
        assert shown.getpixel((0, 216)) == PAD_VALUE and shown.getpixel((0, 217)) == (255, 0, 0)
        assert shown.getpixel((511, 293)) == (255, 0, 0) and shown.getpixel((511, 294)) == PAD_VALUE
    arr = np.zeros((300, 2000, 3), np.uint8)
    arr[:, 850:1150] = 255  # the crop box is white, the rest black
    shown = np.asarray(Placement.create((300, 2000), (512, 512), "crop").apply(Image.fromarray(arr)))
    assert shown.min() >= 250  # only the box is seen
    assert Placement.from_dict(p.to_dict()) == p


def test_invalid_placements_refused():
    with pytest.raises(ConfigError, match="outside"):
        Placement((4, 4), (4, 4), "pad", (0, 0, 5, 4), (0, 0, 4, 4))
    with pytest.raises(ConfigError, match="positive"):
        Placement.create((0, 4), (4, 4), "pad")
    with pytest.raises(ConfigError, match="do not match"):
        Placement.create((4, 4), (4, 4), "pad").labels_to_original(np.zeros((3, 3), int))
