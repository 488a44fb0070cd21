"""Model-free toy-world baselines on hand-made images with a known answer."""

from __future__ import annotations

import numpy as np

from attnseg.toyworld import baselines as B

PALETTE = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210)}


def _image() -> np.ndarray:
    img = np.zeros((6, 6, 3), np.uint8)
    img[:] = PALETTE["green"]
    img[:3, :3] = PALETTE["red"]
    img[3:, 3:] = (np.array(PALETTE["blue"]) * 0.5).astype(np.uint8)  # a dark shade of blue
    return img


def test_nearest_colour_ignores_brightness() -> None:
    idx = B.nearest_colour(_image(), PALETTE)
    assert (idx[:3, :3] == 0).all() and (idx[3:, 3:] == 2).all() and idx[0, 5] == 1


def test_caption_colour_threshold_assigns_named_colours() -> None:
    img = _image()
    # caption: "a red circle (class 1) and a blue square (class 2) on a green background"
    pred = B.caption_colour_threshold(img, [("red", 1), ("blue", 2)], PALETTE, background_colour="green")
    expected = np.zeros((6, 6), np.int64)
    expected[:3, :3] = 1
    expected[3:, 3:] = 2
    np.testing.assert_array_equal(pred, expected)
    # Two objects of one colour: the first named wins; a background colour is never an object.
    pred = B.caption_colour_threshold(img, [("red", 3), ("red", 1), ("green", 2)], PALETTE,
                                      background_colour="green")
    assert (pred[:3, :3] == 3).all() and (pred[0, 5] == 0)
    np.testing.assert_array_equal(B.colour_mask(img, "red", PALETTE), expected == 1)


def test_kmeans_recovers_three_flat_colours_and_pools_masks() -> None:
    img = _image()
    labels = B.kmeans_rgb(img, 3)
    regions = [labels[:3, :3], labels[3:, 3:], labels[0:3, 3:]]
    assert all(len(np.unique(r)) == 1 for r in regions)
    assert len({int(r[0, 0]) for r in regions}) == 3
    masks = B.kmeans_rgb_pooled(img, (2, 3))
    assert masks.shape == (5, 6, 6) and masks.dtype == bool
    assert any((m == (labels == labels[0, 0])).all() for m in masks)
    assert (B.one_segment(img) == 0).all()


def test_superpixels_return_label_maps() -> None:
    img = np.kron(_image(), np.ones((4, 4, 1), np.uint8))
    for labels in (B.slic_segments(img, 4), B.felzenszwalb_segments(img, 100, min_size=4)):
        assert labels.shape == img.shape[:2] and labels.dtype == np.int64 and labels.min() == 0
        # The red block is never split from itself across a flat region's interior.
        assert len(np.unique(labels[2:10, 2:10])) == 1


def test_agnostic_baselines_are_the_named_functions_with_their_parameters():
    from attnseg.toyworld.world import generate_scene, scene_seed

    fns = B.agnostic_baselines()
    assert len(fns) == 1 + 5 + 9 + 12 and "Felzenszwalb s=300 m=10" in fns and "SLIC n=16 c=10" in fns
    sc = generate_scene(scene_seed("val", 0))
    assert np.array_equal(fns["SLIC n=8 c=30"](sc.image, sc.semantic), B.slic_segments(sc.image, 8, compactness=30))
    present = len(np.unique(sc.semantic))
    assert np.array_equal(fns["k-means RGB k=classes present"](sc.image, sc.semantic), B.kmeans_rgb(sc.image, present))
