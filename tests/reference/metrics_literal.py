"""Literal, loop-based segmentation metrics: the oracle of the scoring tests.

Written from the definitions in ``METHODS.md`` (Evaluation), pixel by pixel, without numpy vectorisation, scipy or
any code of ``attnseg.eval``: the Hungarian assignment is found by trying every injective class -> column map.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "best_match_literal",
    "binary_literal",
    "confusion_literal",
    "hungarian_literal",
    "nanmean",
    "nearest_resize_literal",
]


def nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def confusion_literal(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int | None) -> dict:
    """Counts of a semantic prediction: ``matrix[t][p]`` for predictions < C, ``oor[t]`` for the others."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    oor = [0] * num_classes
    for p, t in zip(np.asarray(pred).ravel().tolist(), np.asarray(target).ravel().tolist(), strict=True):
        if ignore is not None and t == ignore:
            continue
        if p < num_classes:
            matrix[t][p] += 1
        else:
            oor[t] += 1
    inter = [matrix[c][c] for c in range(num_classes)]
    gt = [sum(matrix[c]) + oor[c] for c in range(num_classes)]
    predicted = [sum(matrix[r][c] for r in range(num_classes)) for c in range(num_classes)]
    union = [gt[c] + predicted[c] - inter[c] for c in range(num_classes)]
    iou = [_ratio(inter[c], union[c]) for c in range(num_classes)]
    total = sum(gt)
    return {
        "matrix": matrix, "out_of_range": oor, "intersection": inter, "union": union, "iou": iou,
        "miou": nanmean(iou),
        "miou_absent_as_zero": math.fsum(i / (u + 1e-8) for i, u in zip(inter, union, strict=True)) / num_classes,
        "pixel_accuracy": _ratio(sum(inter), total), "num_pixels": total,
        "recall": [_ratio(inter[c], gt[c]) for c in range(num_classes)], "gt": gt, "predicted": predicted,
    }


def hungarian_literal(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int | None) -> dict:
    """One image of DiffSeg's per-image Hungarian protocol by exhaustive search.

    Columns are the raw ids ``0..max(pred)`` padded to at least C; each class takes a distinct column so that the
    summed matches are largest. ``unique`` says whether that best assignment is the only one (ties may be broken
    differently by other solvers, which changes FP/FN but not TP's total).
    """
    pairs = [(int(t), int(p)) for p, t in zip(np.asarray(pred).ravel(), np.asarray(target).ravel(), strict=True)
             if ignore is None or t != ignore]
    width = max(num_classes, max(int(p) for p in np.asarray(pred).ravel()) + 1)
    hist = [[0] * width for _ in range(num_classes)]
    for t, p in pairs:
        hist[t][p] += 1
    best, best_cols, count = -1, None, 0
    for cols in itertools.permutations(range(width), num_classes):
        score = sum(hist[c][cols[c]] for c in range(num_classes))
        if score > best:
            best, best_cols, count = score, cols, 1
        elif score == best:
            count += 1
    assert best_cols is not None
    tp = [hist[c][best_cols[c]] for c in range(num_classes)]
    fn = [sum(hist[c]) - tp[c] for c in range(num_classes)]
    fp = [sum(hist[r][best_cols[c]] for r in range(num_classes)) - tp[c] for c in range(num_classes)]
    iou = [_ratio(tp[c], tp[c] + fp[c] + fn[c]) for c in range(num_classes)]
    return {"tp": tp, "fp": fp, "fn": fn, "num_pixels": len(pairs), "iou": iou, "miou": nanmean(iou),
            "accuracy": _ratio(sum(tp), len(pairs)), "unique": count == 1, "hist": hist,
            "mapping": {best_cols[c]: c for c in range(num_classes)}}


def best_match_literal(masks: np.ndarray, target: np.ndarray, num_classes: int, ignore: int | None) -> list[float]:
    """For each class present in ``target`` (ascending), the best IoU over the masks ``(K, H, W)`` bool, counted
    over non-ignored pixels only (0 when there is no mask)."""
    t = np.asarray(target).ravel().tolist()
    valid = [ignore is None or v != ignore for v in t]
    out = []
    for c in sorted({v for v, ok in zip(t, valid, strict=True) if ok}):
        best = 0.0
        for m in masks:
            mm = np.asarray(m).ravel().tolist()
            inter = sum(1 for a, b, ok in zip(mm, t, valid, strict=True) if ok and a and b == c)
            union = sum(1 for a, b, ok in zip(mm, t, valid, strict=True) if ok and (a or b == c))
            best = max(best, inter / union if union else 0.0)
        out.append(best)
    return out


def binary_literal(pred: np.ndarray, positive_target: np.ndarray, valid: np.ndarray | None = None) -> dict:
    """Counts and scores of a binary mask (``pred`` non-zero = positive) against a boolean target."""
    tp = fp = fn = tn = 0
    v = np.ones(np.asarray(pred).shape, bool) if valid is None else valid
    for p, t, ok in zip(np.asarray(pred).ravel(), np.asarray(positive_target).ravel(), v.ravel(), strict=True):
        if not ok:
            continue
        p, t = bool(p), bool(t)
        tp += p and t
        fp += p and not t
        fn += t and not p
        tn += not p and not t
    iou, iou_bg = _ratio(tp, tp + fp + fn), _ratio(tn, tn + fp + fn)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou": iou, "iou_background": iou_bg, "miou": nanmean([iou, iou_bg])}


def nearest_resize_literal(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize with PyTorch's rule ``src = floor(dst * in / out)``, one pixel at a time."""
    h, w = ids.shape
    out = np.zeros(size, dtype=np.int64)
    for y in range(size[0]):
        for x in range(size[1]):
            out[y, x] = ids[(y * h) // size[0], (x * w) // size[1]]
    return out
