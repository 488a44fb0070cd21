"""A literal, loop-based DiffSeg in float64 numpy, written from ``METHODS.md`` §2 and a reading of the reference
(``google/diffseg:diffseg/segmentor.py``). Used only as an oracle by tests and as the baseline of
``benchmarks/diffseg_postprocess.py``; deliberately slow and plain.

Faithful to the reference in structure: per-resolution aggregation with per-query resizing and explicit query
tiling, iteration 0 as one KL evaluation per anchor against every map (the reference's broadcast formula
``sum x (log x - log Y) / 2 - sum Y (log x - log Y) / 2``, no epsilon), later iterations as the reference's
``matched``-set walk, and a bilinear upsample of each proposal followed by argmax. Differences, on purpose:
float64 throughout (the reference runs iteration 0 in fp16), and the grid side / output size are parameters
instead of 64 / 512.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "aggregate_weights",
    "bilinear_matrix",
    "bilinear_resize",
    "generate_masks",
    "generate_sampling_grid",
    "get_weight_ratio",
    "kl",
    "mask_merge_first",
    "mask_merge_later",
    "segment",
    "upsample_argmax",
]


def generate_sampling_grid(num_of_points: int, size: int = 64) -> np.ndarray:
    """Anchor grid, ``(num_of_points**2, 2)`` int (row, col), row slowest; 63 generalised to ``size - 1``."""
    last = size - 1
    segment_len = last // (num_of_points - 1)
    total_len = segment_len * (num_of_points - 1)
    start_point = (last - total_len) // 2
    x_new = np.linspace(start_point, total_len + start_point, num_of_points)
    y_new = np.linspace(start_point, total_len + start_point, num_of_points)
    x_new, y_new = np.meshgrid(x_new, y_new, indexing="ij")
    return np.concatenate([x_new.reshape(-1, 1), y_new.reshape(-1, 1)], axis=-1).astype(int)


def get_weight_ratio(weight_list: list[np.ndarray]) -> np.ndarray:
    """Weights proportional to resolution: ``sqrt(N_r) / sum sqrt(N_r)``."""
    sizes = [np.sqrt(w.shape[-2]) for w in weight_list]
    return np.asarray(sizes) / np.sum(sizes)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of a half-pixel bilinear resize along one axis (TF2 / PyTorch
    ``align_corners=False``, no antialiasing), built one output index at a time."""
    mat = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5
        src = max(src, 0.0)
        i0 = int(np.floor(src))
        i0 = min(i0, n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        mat[o, i0] += 1.0 - frac
        mat[o, i1] += frac
    return mat


def bilinear_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of one ``(h, w)`` map to ``(out_h, out_w)``."""
    h, w = img.shape
    return bilinear_matrix(h, out_h) @ img @ bilinear_matrix(w, out_w).T


def aggregate_weights(weight_list: list[np.ndarray], weight_ratio: np.ndarray | None = None) -> np.ndarray:
    """Steps 1-3. ``weight_list``: ``(N_r, N_r)`` head/layer-averaged maps. Returns ``(R, R, R, R)`` float64."""
    if weight_ratio is None:
        weight_ratio = get_weight_ratio(weight_list)
    big = max(math.isqrt(w.shape[-1]) for w in weight_list)
    aggre = np.zeros((big, big, big, big))
    for index, weights in enumerate(weight_list):
        size = math.isqrt(weights.shape[-1])
        ratio = big // size
        weights = np.asarray(weights, dtype=np.float64)
        # KeyUp each query's key map, then renormalise it to sum 1.
        up = np.zeros((size, size, big, big))
        for q in range(size * size):
            key_map = bilinear_resize(weights[q].reshape(size, size), big, big)
            up[q // size, q % size] = key_map / key_map.sum()
        # QueryTile: every fine query takes its coarse query's map.
        for i in range(big):
            for j in range(big):
                aggre[i, j] += up[i // ratio, j // ratio] * weight_ratio[index]
    return aggre


def kl(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The reference's symmetric KL over the last two axes (no epsilon; NaN where a zero meets a log)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        quotient = np.log(x) - np.log(y)
        kl_1 = np.sum(x * quotient, axis=(-2, -1)) / 2
        kl_2 = -np.sum(y * quotient, axis=(-2, -1)) / 2
    return kl_1 + kl_2


def mask_merge_first(attns: np.ndarray, kl_threshold: float, grid: np.ndarray) -> np.ndarray:
    """Iteration 0: one KL evaluation per anchor against every map; proposal = mean of the maps under the
    threshold (``0/0 = NaN`` for an empty group, as the reference). Returns ``(M, R, R)``."""
    qh, qw, kh, kw = attns.shape
    maps = attns.reshape(qh * qw, kh, kw)
    proposals = []
    for row, col in grid:
        anchor = attns[row, col]
        kl_bin = kl(anchor[None], maps) < kl_threshold
        total = np.zeros((kh, kw))
        for n in range(maps.shape[0]):
            if kl_bin[n]:
                total += maps[n]
        with np.errstate(divide="ignore", invalid="ignore"):
            proposals.append(total / kl_bin.sum())
    return np.asarray(proposals)


def mask_merge_later(attns: np.ndarray, kl_threshold: float) -> np.ndarray:
    """Iterations >= 1: walk the proposals; skip matched ones; group all proposals within the threshold
    (matched ones included); emit the group mean if the group is non-empty. ``(K, R, R) -> (K', R, R)``."""
    matched: set[int] = set()
    new_attns = []
    for i, anchor in enumerate(attns):
        if i in matched:
            continue
        matched.add(i)
        kl_bin = kl(anchor[None], attns) < kl_threshold
        if kl_bin.sum() > 0:
            for idx in np.arange(len(attns))[kl_bin]:
                matched.add(int(idx))
            new_attns.append(attns[kl_bin].mean(0))
    return np.asarray(new_attns)


def generate_masks(attns: np.ndarray, kl_thresholds: list[float], grid: np.ndarray) -> np.ndarray:
    """Steps 5-7: ``(R, R, R, R)`` -> ``(K, R, R)`` proposals."""
    merged = mask_merge_first(attns, kl_thresholds[0], grid)
    for threshold in kl_thresholds[1:]:
        merged = mask_merge_later(merged, threshold)
    return merged


def upsample_argmax(proposals: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Step 9: bilinear upsample each proposal, then argmax over proposals. Returns ``(H, W)`` int64 (proposal
    indices, not renumbered)."""
    up = np.stack([bilinear_resize(p, out_h, out_w) for p in proposals])
    return up.argmax(axis=0).astype(np.int64)


def segment(
    weight_list: list[np.ndarray],
    kl_thresholds: list[float],
    num_points: int,
    out_size: tuple[int, int],
    weight_ratio: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The whole post-processing. Returns ``(labels (H, W) int64, proposals (K, R, R))``."""
    attns = aggregate_weights(weight_list, weight_ratio)
    grid = generate_sampling_grid(num_points, attns.shape[0])
    proposals = generate_masks(attns, kl_thresholds, grid)
    return upsample_argmax(proposals, *out_size), proposals
