"""Model-free baselines for the toy world: what colour, texture and edges alone achieve.

A method that reads segmentation out of a diffusion model is only worth something where it beats these on
the same scenes under the same scoring rule. Each baseline is a pure function of the image (and, where a
method is given text, of the same text):

- :func:`one_segment`: the whole image as one segment.
- :func:`kmeans_rgb`: k-means on pixel colours (one k, or pooled over several k as a mask set).
- :func:`slic_segments`, :func:`felzenszwalb_segments`: superpixels (scikit-image).
- :func:`caption_colour_threshold`: each pixel takes the nearest palette colour (by chromaticity, so
  lighting and shades do not matter) and the class the caption names for that colour; the strongest
  text-given baseline for the semantic methods.
- :func:`colour_mask`: the pixels of one named colour (the text-given baseline for one-object masks).

Arrays: ``image (H, W, 3) uint8`` RGB; label maps ``(H, W) int64``; mask sets ``(M, H, W) bool``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "agnostic_baselines",
    "caption_colour_threshold",
    "colour_mask",
    "felzenszwalb_segments",
    "kmeans_rgb",
    "kmeans_rgb_pooled",
    "nearest_colour",
    "one_segment",
    "slic_segments",
]


def one_segment(image: NDArray[np.uint8]) -> NDArray[np.int64]:
    """Every pixel in segment 0."""
    return np.zeros(image.shape[:2], dtype=np.int64)


def kmeans_rgb(image: NDArray[np.uint8], k: int, *, seed: int = 0) -> NDArray[np.int64]:
    """k-means (k-means++, 4 restarts, ``seed``) on the RGB values of the pixels; returns cluster ids."""
    from sklearn.cluster import KMeans

    h, w = image.shape[:2]
    rgb = image.reshape(-1, 3).astype(np.float32)
    k = min(k, len(np.unique(rgb, axis=0)))
    labels = KMeans(k, n_init=4, random_state=seed).fit_predict(rgb)
    return labels.reshape(h, w).astype(np.int64)


def kmeans_rgb_pooled(
    image: NDArray[np.uint8], ks: Sequence[int] = (2, 5, 6, 10, 20), *, seed: int = 0
) -> NDArray[np.bool_]:
    """The clusters of :func:`kmeans_rgb` at every k in ``ks``, pooled into one ``(M, H, W) bool`` mask set
    (the same k list as principal-component clustering, Stillger et al., so the two compare mask for mask)."""
    masks = []
    for k in ks:
        labels = kmeans_rgb(image, k, seed=seed)
        masks.extend(labels == i for i in np.unique(labels))
    return np.stack(masks)


def slic_segments(image: NDArray[np.uint8], n_segments: int, *, compactness: float = 10.0) -> NDArray[np.int64]:
    """SLIC superpixels (scikit-image, Lab colour, ``start_label=0``)."""
    from skimage.segmentation import slic

    return slic(image, n_segments=n_segments, compactness=compactness, start_label=0).astype(np.int64)


def felzenszwalb_segments(
    image: NDArray[np.uint8], scale: float, *, sigma: float = 0.8, min_size: int = 20
) -> NDArray[np.int64]:
    """Felzenszwalb's graph-based segmentation (scikit-image)."""
    from skimage.segmentation import felzenszwalb

    return felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size).astype(np.int64)


def _chromaticity(rgb: NDArray[np.floating]) -> NDArray[np.float64]:
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb / np.maximum(rgb.sum(-1, keepdims=True), 1e-6)


def nearest_colour(image: NDArray[np.uint8], palette: Mapping[str, Sequence[int]]) -> NDArray[np.int64]:
    """Per pixel the index (in ``palette`` order) of the palette colour with the nearest chromaticity."""
    chroma = _chromaticity(image)
    ref = _chromaticity(np.asarray(list(palette.values()), dtype=np.float64))
    d = ((chroma[:, :, None, :] - ref[None, None]) ** 2).sum(-1)
    return d.argmin(-1).astype(np.int64)


def caption_colour_threshold(
    image: NDArray[np.uint8],
    objects: Sequence[tuple[str, int]],
    palette: Mapping[str, Sequence[int]],
    *,
    background_colour: str | None = None,
) -> NDArray[np.int64]:
    """Class ids from colour alone, given the caption: each pixel takes the nearest palette colour, and the
    class of the first object the caption names in that colour (0 when no object has that colour, or when it
    is the colour the caption gives the background).

    Args:
        image: ``(H, W, 3) uint8``.
        objects: ``(colour, class_id)`` per object the caption names, in caption order.
        palette: colour name -> RGB.
        background_colour: the caption's background colour, if it names one.
    """
    names = list(palette)
    lut = np.zeros(len(names), dtype=np.int64)
    for colour, class_id in reversed(list(objects)):  # reversed: the first object named wins
        if colour in palette and colour != background_colour:
            lut[names.index(colour)] = class_id
    return lut[nearest_colour(image, palette)]


def colour_mask(image: NDArray[np.uint8], colour: str, palette: Mapping[str, Sequence[int]]) -> NDArray[np.bool_]:
    """The pixels whose nearest palette colour is ``colour``."""
    return nearest_colour(image, palette) == list(palette).index(colour)


def agnostic_baselines() -> dict[str, Callable[[NDArray[np.uint8], NDArray[np.integer]], NDArray[np.int64]]]:
    """The class-agnostic baselines of the toy-world benchmarks, by name: one segment; RGB k-means at k = 2-5 and
    at k = the number of classes present (an oracle k, from the ground truth); SLIC and Felzenszwalb over a grid
    of parameters. Each takes ``(image, semantic)`` (only the oracle k reads ``semantic``)."""
    fns: dict[str, Callable[[NDArray[np.uint8], NDArray[np.integer]], NDArray[np.int64]]] = {
        "one segment": lambda image, semantic: one_segment(image)
    }
    for k in (2, 3, 4, 5):
        fns[f"k-means RGB k={k}"] = lambda image, semantic, k=k: kmeans_rgb(image, k)
    fns["k-means RGB k=classes present"] = lambda image, semantic: kmeans_rgb(image, len(np.unique(semantic)))
    for n, comp in itertools.product((4, 8, 16), (3, 10, 30)):
        fns[f"SLIC n={n} c={comp}"] = lambda image, semantic, n=n, comp=comp: slic_segments(
            image, n, compactness=comp)
    for scale, size in itertools.product((30, 100, 300, 1000), (10, 30, 60)):
        fns[f"Felzenszwalb s={scale} m={size}"] = lambda image, semantic, scale=scale, size=size: (
            felzenszwalb_segments(image, scale, min_size=size))
    return fns
