"""Segmentation metrics: confusion matrices, Hungarian matching, binary and mask-set scores.

Everything here is numpy. Inputs may be numpy arrays or torch tensors (converted with
``.detach().cpu().numpy()``); torch is never imported.

Conventions shared by all functions:

- Label maps are ``(H, W)`` integer arrays. ``target`` holds class ids in ``[0, num_classes)``
  or ``ignore_index``; any other target value is an error, never silently dropped.
- ``pred`` holds non-negative ids. For semantic scoring they are class ids; for the Hungarian
  protocols they are arbitrary segment ids.
- Pixels whose target is ``ignore_index`` are excluded from every count.
- Ratios with a zero denominator are NaN, except where a protocol says otherwise (GoCA's
  ``I / (U + 1e-8)``).

Protocols (see ``docs``/METHODS.md "Evaluation"):

- :class:`ConfusionMatrix`: semantic segmentation, ids shared across images.
- :class:`PerImageHungarian`: DiffSeg's protocol, one assignment per image, TP/FP/FN summed.
- :class:`DatasetHungarian`: PiCIE's stricter protocol, one assignment for the dataset.
- :func:`binary_scores` / :class:`BinaryAccumulator`: target (e.g. hair) masks.
- :func:`top_n_iou`, :func:`best_match_iou`: class-agnostic mask sets (Stillger et al.).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import linear_sum_assignment

from attnseg.errors import ConfigError

__all__ = [
    "BinaryAccumulator",
    "BinaryCounts",
    "BinaryResult",
    "BinaryScores",
    "ConfusionMatrix",
    "DatasetHungarian",
    "HungarianScores",
    "PerImageHungarian",
    "TopNResult",
    "best_match_iou",
    "binary_scores",
    "hungarian_counts",
    "hungarian_match",
    "label_masks",
    "pairwise_iou",
    "top_n_iou",
]

# Above this many columns the raw-id confusion layout would be wasteful; ids are compacted.
_MAX_DENSE_PRED_ID = 1 << 12


# --------------------------------------------------------------------------------------------
# helpers


def _as_numpy(x: Any) -> NDArray[Any]:
    """Convert a numpy array, a torch tensor (any device) or a nested sequence to numpy."""
    if hasattr(x, "detach"):
        x = x.detach()
    if hasattr(x, "cpu"):
        x = x.cpu()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        x = x.numpy()
    return np.asarray(x)


def _as_labels(x: Any, name: str) -> NDArray[np.int64]:
    arr = _as_numpy(x)
    if arr.dtype == np.bool_:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{name} must be an integer label map, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_pair(pred: Any, target: Any) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    p = _as_labels(pred, "pred")
    t = _as_labels(target, "target")
    if p.shape != t.shape:
        raise ConfigError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    if p.size and p.min() < 0:
        raise ConfigError(f"pred must hold non-negative ids, found {int(p.min())}")
    return p.ravel(), t.ravel()


def _valid_mask(target: NDArray[np.int64], num_classes: int, ignore_index: int | None) -> NDArray[np.bool_]:
    """Boolean mask of scored pixels; raises on target values that are neither a class nor ignored."""
    valid = (target >= 0) & (target < num_classes)
    bad = ~valid if ignore_index is None else ~valid & (target != ignore_index)
    if bad.any():
        value = int(target[bad][0])
        raise ConfigError(
            f"target contains label {value} outside [0, {num_classes}) that is not ignore_index={ignore_index}"
        )
    return valid


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _safe_div(num: NDArray[Any], den: NDArray[Any]) -> NDArray[np.float64]:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(x: NDArray[np.float64]) -> float:
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else math.nan


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _json_floats(x: NDArray[np.float64] | Sequence[float]) -> list[float | None]:
    return [_json_float(float(v)) for v in x]


def _check_kind(data: Mapping[str, Any], kind: str) -> None:
    if data.get("kind") != kind:
        raise ConfigError(f"expected a serialised {kind!r}, got kind={data.get('kind')!r}")


def _hungarian_hist(
    pred: NDArray[np.int64], target: NDArray[np.int64], num_classes: int, ignore_index: int | None
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Confusion of one image for Hungarian matching.

    Returns ``(hist, col_ids)``: ``hist`` is ``(num_classes, max(num_classes, K))`` int64 with
    rows = target class and columns = predicted ids ``col_ids`` (``(max(num_classes, K),)``
    int64, -1 for padding columns). As in DiffSeg/PiCIE, columns are the raw ids
    ``0..max(pred)`` (K = max(pred) + 1 over all pixels); when an id exceeds 4095 the ids present
    are compacted instead, which can only change how exact ties are broken.
    """
    valid = _valid_mask(target, num_classes, ignore_index)
    max_id = int(pred.max()) if pred.size else 0
    if max_id < _MAX_DENSE_PRED_ID:
        k = max_id + 1
        cols = pred[valid]
        col_ids = np.arange(max(num_classes, k), dtype=np.int64)
        col_ids[k:] = -1
    else:
        present, cols = np.unique(pred[valid], return_inverse=True)
        k = present.size
        col_ids = np.full(max(num_classes, k), -1, dtype=np.int64)
        col_ids[:k] = present
    width = col_ids.size
    hist = np.bincount(target[valid] * width + cols, minlength=num_classes * width)
    return hist.reshape(num_classes, width).astype(np.int64, copy=False), col_ids


def _assign(hist: NDArray[np.int64]) -> NDArray[np.int64]:
    """Column index matched to each row (class) by ``linear_sum_assignment(maximize=True)``.

    ``hist`` must have at least as many columns as rows, so every class gets a column (possibly
    an empty one).
    """
    rows, cols = linear_sum_assignment(hist, maximize=True)
    out = np.empty(hist.shape[0], dtype=np.int64)
    out[rows] = cols
    return out


def _tp_fp_fn(
    hist: NDArray[np.int64], assigned: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """TP_c = H[c, π(c)], FN_c = row sum − TP_c, FP_c = column sum of π(c) − TP_c (METHODS.md §2)."""
    rows = np.arange(hist.shape[0])
    tp = hist[rows, assigned]
    fn = hist.sum(axis=1) - tp
    fp = hist.sum(axis=0)[assigned] - tp
    return tp, fp, fn


def _hungarian_counts(
    hist: NDArray[np.int64], present_only: bool
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """TP/FP/FN per class of one image's confusion, and the column matched to each class (-1: none).

    With ``present_only`` only the classes that have pixels in the target take part in the assignment:
    an absent class can then never be matched to a segment (and charged its pixels as false positives).
    """
    rows = np.flatnonzero(hist.sum(axis=1) > 0) if present_only else np.arange(hist.shape[0])
    c = hist.shape[0]
    tp, fp, fn = (np.zeros(c, dtype=np.int64) for _ in range(3))
    assigned = np.full(c, -1, dtype=np.int64)
    if rows.size:
        sub = _assign(hist[rows])
        t, f, n = _tp_fp_fn(hist[rows], sub)
        tp[rows], fp[rows], fn[rows], assigned[rows] = t, f, n, sub
    return tp, fp, fn, assigned


def hungarian_counts(
    pred: ArrayLike, target: ArrayLike, num_classes: int, *, ignore_index: int | None = 255, present_only: bool = False
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """One image's ``(C,)`` TP, FP and FN after per-image Hungarian matching (see :class:`PerImageHungarian`).

    Args:
        pred: ``(H, W)`` non-negative segment ids.
        target: ``(H, W)`` class ids or ``ignore_index``.
        num_classes: C.
        ignore_index: target value excluded from scoring.
        present_only: match only the classes present in ``target`` (the lenient rule); default: all classes.
    """
    p, t = _check_pair(pred, target)
    hist, _ = _hungarian_hist(p, t, _check_num_classes(num_classes), ignore_index)
    tp, fp, fn, _ = _hungarian_counts(hist, present_only)
    return tp, fp, fn


# --------------------------------------------------------------------------------------------
# semantic confusion matrix


class ConfusionMatrix:
    """Accumulated confusion matrix for semantic segmentation (class ids shared across images).

    Args:
        num_classes: number of classes C; target ids are ``0..C-1``.
        ignore_index: target value excluded from scoring (None: every target pixel must be a class).

    ``pred`` ids ``>= num_classes`` (e.g. an "unknown" or unmatched segment id) are counted as
    wrong: the pixel adds to its target class's row total (a false negative) but to no column,
    so it is a false positive for no class. They are kept in :attr:`out_of_range`.

    Example:
        >>> cm = ConfusionMatrix(2)
        >>> cm.update(np.array([[0, 1]]), np.array([[0, 0]]))
        >>> cm.matrix.tolist()
        [[1, 1], [0, 0]]
        >>> cm.iou().round(2).tolist()
        [0.5, 0.0]
    """

    def __init__(self, num_classes: int, *, ignore_index: int | None = 255) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = ignore_index
        self._matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self._out_of_range = np.zeros(self.num_classes, dtype=np.int64)

    def reset(self) -> None:
        """Clear all counts."""
        self._matrix[:] = 0
        self._out_of_range[:] = 0

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one image (or a batch: any matching shapes).

        Args:
            pred: ``(H, W)`` integer, non-negative predicted class ids.
            target: ``(H, W)`` integer, class ids in ``[0, C)`` or ``ignore_index``.
        """
        p, t = _check_pair(pred, target)
        valid = _valid_mask(t, self.num_classes, self.ignore_index)
        p, t = p[valid], t[valid]
        c = self.num_classes
        in_range = p < c
        self._matrix += np.bincount(t[in_range] * c + p[in_range], minlength=c * c).reshape(c, c)
        self._out_of_range += np.bincount(t[~in_range], minlength=c)

    @property
    def matrix(self) -> NDArray[np.int64]:
        """``(C, C)`` int64 copy; rows = target class, columns = predicted class."""
        return self._matrix.copy()

    @property
    def out_of_range(self) -> NDArray[np.int64]:
        """``(C,)`` int64: per target class, pixels predicted with an id ``>= C``."""
        return self._out_of_range.copy()

    @property
    def num_pixels(self) -> int:
        """Number of scored (non-ignored) pixels."""
        return int(self._matrix.sum() + self._out_of_range.sum())

    def intersection(self) -> NDArray[np.int64]:
        """``(C,)`` int64 true positives per class."""
        return np.diag(self._matrix).copy()

    def union(self) -> NDArray[np.int64]:
        """``(C,)`` int64 TP + FP + FN per class (out-of-range predictions count as FN)."""
        gt = self._matrix.sum(axis=1) + self._out_of_range
        union: NDArray[np.int64] = gt + self._matrix.sum(axis=0) - np.diag(self._matrix)
        return union

    def iou(self) -> NDArray[np.float64]:
        """``(C,)`` float64 IoU per class; NaN for a class absent from both target and prediction."""
        return _safe_div(self.intersection(), self.union())

    def miou(self) -> float:
        """Mean IoU over classes with a defined IoU (NaN-mean); NaN when nothing was scored."""
        return _nanmean(self.iou())

    def iou_absent_as_zero(self, eps: float = 1e-8) -> NDArray[np.float64]:
        """``(C,)`` float64 ``I / (U + eps)``: GoCA's variant, an absent class scores 0, not NaN."""
        return self.intersection() / (self.union() + eps)

    def miou_absent_as_zero(self, eps: float = 1e-8) -> float:
        """GoCA's mIoU: I and U summed over the dataset, ``I / (U + 1e-8)``, mean over **all** C classes.

        Classes never seen in target nor prediction count as 0, so this is never above
        :meth:`miou` on the same counts.
        """
        return float(self.iou_absent_as_zero(eps).mean())

    def pixel_accuracy(self) -> float:
        """Correct pixels / scored pixels; NaN when nothing was scored."""
        return _ratio(float(np.trace(self._matrix)), self.num_pixels)

    def class_accuracy(self) -> NDArray[np.float64]:
        """``(C,)`` float64 per-class recall TP / (TP + FN); NaN for classes absent from the target."""
        return _safe_div(self.intersection(), self._matrix.sum(axis=1) + self._out_of_range)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts in place (sharded runs) and return ``self``."""
        if not isinstance(other, ConfusionMatrix):
            raise ConfigError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ConfigError(
                f"cannot merge ConfusionMatrix(num_classes={other.num_classes}, ignore_index={other.ignore_index})"
                f" into ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index})"
            )
        self._matrix += other._matrix
        self._out_of_range += other._out_of_range
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (counts, not derived scores)."""
        return {
            "kind": "confusion_matrix",
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "matrix": self._matrix.tolist(),
            "out_of_range": self._out_of_range.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfusionMatrix:
        """Inverse of :meth:`to_dict`."""
        _check_kind(data, "confusion_matrix")
        cm = cls(int(data["num_classes"]), ignore_index=data["ignore_index"])
        matrix = np.asarray(data["matrix"], dtype=np.int64)
        if matrix.shape != cm._matrix.shape:
            raise ConfigError(f"matrix has shape {matrix.shape}, expected {cm._matrix.shape}")
        cm._matrix[:] = matrix
        cm._out_of_range[:] = np.asarray(data.get("out_of_range", np.zeros(cm.num_classes)), dtype=np.int64)
        return cm

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"num_pixels={self.num_pixels})"
        )


# --------------------------------------------------------------------------------------------
# Hungarian matching


def hungarian_match(
    pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int | None = 255
) -> dict[int, int]:
    """Match the segment ids of one prediction to classes (DiffSeg / PiCIE style).

    The confusion over valid pixels has shape ``(num_classes, max(num_classes, K))`` with
    ``K = max(pred) + 1``; ``scipy.optimize.linear_sum_assignment(maximize=True)`` pairs each
    class with one column.

    Args:
        pred: ``(H, W)`` integer, non-negative segment ids (arbitrary, not class ids).
        target: ``(H, W)`` integer, class ids in ``[0, num_classes)`` or ``ignore_index``.
        num_classes: number of classes.
        ignore_index: target value excluded from the confusion.

    Returns:
        ``{predicted id: class}`` for matched ids that cover at least one valid pixel. Ids left
        unmatched (more segments than classes) or present only on ignored pixels are absent.
    """
    c = _check_num_classes(num_classes)
    p, t = _check_pair(pred, target)
    hist, col_ids = _hungarian_hist(p, t, c, ignore_index)
    assigned = _assign(hist)
    used = hist.sum(axis=0) > 0
    return {int(col_ids[j]): cls for cls, j in enumerate(assigned.tolist()) if col_ids[j] >= 0 and used[j]}


@dataclass(frozen=True)
class HungarianScores:
    """Result of a Hungarian-matching protocol.

    Attributes:
        protocol: ``"per-image-hungarian"`` or ``"dataset-hungarian"``.
        accuracy: ΣTP / number of valid pixels.
        miou: NaN-mean of ``iou`` (classes with TP + FP + FN = 0 are skipped).
        iou: ``(C,)`` float64, TP / (TP + FP + FN), NaN when the denominator is 0.
        tp, fp, fn: ``(C,)`` int64 counts summed over the dataset.
        num_pixels: valid (non-ignored) pixels.
        num_images: images added.
        mapping: predicted id -> class (dataset-level protocol only; None for per-image).
    """

    protocol: str
    accuracy: float
    miou: float
    iou: NDArray[np.float64]
    tp: NDArray[np.int64]
    fp: NDArray[np.int64]
    fn: NDArray[np.int64]
    num_pixels: int
    num_images: int
    mapping: dict[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; NaN becomes None."""
        return {
            "protocol": self.protocol,
            "accuracy": _json_float(self.accuracy),
            "miou": _json_float(self.miou),
            "iou": _json_floats(self.iou),
            "tp": self.tp.tolist(),
            "fp": self.fp.tolist(),
            "fn": self.fn.tolist(),
            "num_pixels": self.num_pixels,
            "num_images": self.num_images,
            "mapping": None if self.mapping is None else {str(k): v for k, v in self.mapping.items()},
        }


def _hungarian_scores(
    protocol: str,
    tp: NDArray[np.int64],
    fp: NDArray[np.int64],
    fn: NDArray[np.int64],
    num_pixels: int,
    num_images: int,
    mapping: dict[int, int] | None = None,
) -> HungarianScores:
    iou = _safe_div(tp, tp + fp + fn)
    return HungarianScores(
        protocol=protocol,
        accuracy=_ratio(float(tp.sum()), num_pixels),
        miou=_nanmean(iou),
        iou=iou,
        tp=tp.copy(),
        fp=fp.copy(),
        fn=fn.copy(),
        num_pixels=int(num_pixels),
        num_images=int(num_images),
        mapping=mapping,
    )


class PerImageHungarian:
    """DiffSeg's evaluation: Hungarian matching per image, TP/FP/FN summed over the dataset.

    For each image (METHODS.md §2, code ``google/diffseg:diffseg/utils.py``):

    1. confusion H over valid pixels, ``C x max(C, K)`` (K = max predicted id + 1);
    2. π = ``linear_sum_assignment(H, maximize=True)``;
    3. TP_c = H[c, π(c)], FN_c = row sum − TP_c, FP_c = column sum of π(c) − TP_c; segments
       left unmatched add **no** false positives (their pixels are FN of their true class);
    4. TP, FP, FN are summed over images.

    Scores: accuracy = ΣTP / #valid pixels, IoU_c = TP_c / (TP_c + FP_c + FN_c), mIoU = NaN-mean
    over classes. This is more lenient than :class:`DatasetHungarian`, since every image gets
    its own assignment.

    Args:
        num_classes: number of classes C.
        ignore_index: target value excluded from scoring.
        present_only: take only the classes present in each image's target into its assignment (the more
            lenient rule: absent classes are never charged false positives). Default False: all C classes
            take part, as in DiffSeg's code.
    """

    protocol = "per-image-hungarian"

    def __init__(self, num_classes: int, *, ignore_index: int | None = 255, present_only: bool = False) -> None:
        self.num_classes = _check_num_classes(num_classes)
        self.ignore_index = ignore_index
        self.present_only = bool(present_only)
        self._tp = np.zeros(self.num_classes, dtype=np.int64)
        self._fp = np.zeros(self.num_classes, dtype=np.int64)
        self._fn = np.zeros(self.num_classes, dtype=np.int64)
        self._num_pixels = 0
        self._num_images = 0

    def update(self, pred: ArrayLike, target: ArrayLike) -> dict[int, int]:
        """Score one image and return its assignment ``{predicted id: class}``.

        Args:
            pred: ``(H, W)`` integer, non-negative segment ids.
            target: ``(H, W)`` integer, class ids or ``ignore_index``.
        """
        p, t = _check_pair(pred, target)
        hist, col_ids = _hungarian_hist(p, t, self.num_classes, self.ignore_index)
        tp, fp, fn, assigned = _hungarian_counts(hist, self.present_only)
        self._tp += tp
        self._fp += fp
        self._fn += fn
        self._num_pixels += int(hist.sum())
        self._num_images += 1
        used = hist.sum(axis=0) > 0
        return {
            int(col_ids[j]): c for c, j in enumerate(assigned.tolist()) if j >= 0 and col_ids[j] >= 0 and used[j]
        }

    def result(self) -> HungarianScores:
        """Scores over everything added so far."""
        return _hungarian_scores(self.protocol, self._tp, self._fp, self._fn, self._num_pixels, self._num_images)

    def merge(self, other: PerImageHungarian) -> PerImageHungarian:
        """Add another accumulator's counts in place and return ``self``."""
        if not isinstance(other, PerImageHungarian):
            raise ConfigError(f"can only merge a PerImageHungarian, got {type(other).__name__}")
        if (other.num_classes, other.ignore_index, other.present_only) != (
            self.num_classes, self.ignore_index, self.present_only
        ):
            raise ConfigError(
                "cannot merge PerImageHungarian accumulators with different num_classes/ignore_index/present_only"
            )
        self._tp += other._tp
        self._fp += other._fp
        self._fn += other._fn
        self._num_pixels += other._num_pixels
        self._num_images += other._num_images
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {
            "kind": self.protocol,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "present_only": self.present_only,
            "tp": self._tp.tolist(),
            "fp": self._fp.tolist(),
            "fn": self._fn.tolist(),
            "num_pixels": self._num_pixels,
            "num_images": self._num_images,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerImageHungarian:
        """Inverse of :meth:`to_dict`."""
        _check_kind(data, cls.protocol)
        acc = cls(
            int(data["num_classes"]),
            ignore_index=data["ignore_index"],
            present_only=bool(data.get("present_only", False)),
        )
        acc._tp[:] = np.asarray(data["tp"], dtype=np.int64)
        acc._fp[:] = np.asarray(data["fp"], dtype=np.int64)
        acc._fn[:] = np.asarray(data["fn"], dtype=np.int64)
        acc._num_pixels = int(data["num_pixels"])
        acc._num_images = int(data["num_images"])
        return acc


class DatasetHungarian:
    """PiCIE's stricter protocol: one confusion over the dataset, one assignment at the end.

    Only meaningful when predicted ids mean the same thing in every image (semantic labels,
    or a clustering fitted on the whole dataset). The accumulated confusion has shape
    ``(C, max(C, max_pred_ids))``; :meth:`result` matches it once with
    ``linear_sum_assignment(maximize=True)`` and scores TP/FP/FN as :class:`PerImageHungarian`
    does (unmatched ids add no FP).

    Args:
        num_classes: number of classes C.
        max_pred_ids: predicted ids must lie in ``[0, max_pred_ids)``.
        ignore_index: target value excluded from scoring.
    """

    protocol = "dataset-hungarian"

    def __init__(self, num_classes: int, max_pred_ids: int, *, ignore_index: int | None = 255) -> None:
        self.num_classes = _check_num_classes(num_classes)
        if isinstance(max_pred_ids, bool) or not isinstance(max_pred_ids, (int, np.integer)) or max_pred_ids < 1:
            raise ConfigError(f"max_pred_ids must be a positive integer, got {max_pred_ids!r}")
        self.max_pred_ids = int(max_pred_ids)
        self.ignore_index = ignore_index
        self._hist = np.zeros((self.num_classes, max(self.num_classes, self.max_pred_ids)), dtype=np.int64)
        self._num_images = 0

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add one image.

        Args:
            pred: ``(H, W)`` integer ids in ``[0, max_pred_ids)``.
            target: ``(H, W)`` integer, class ids or ``ignore_index``.
        """
        p, t = _check_pair(pred, target)
        valid = _valid_mask(t, self.num_classes, self.ignore_index)
        p, t = p[valid], t[valid]
        if p.size and p.max() >= self.max_pred_ids:
            raise ConfigError(f"pred id {int(p.max())} >= max_pred_ids={self.max_pred_ids}")
        width = self._hist.shape[1]
        self._hist += np.bincount(t * width + p, minlength=self._hist.size).reshape(self._hist.shape)
        self._num_images += 1

    @property
    def matrix(self) -> NDArray[np.int64]:
        """``(C, max(C, max_pred_ids))`` int64 copy; rows = target class, columns = predicted id."""
        return self._hist.copy()

    def mapping(self) -> dict[int, int]:
        """``{predicted id: class}`` of the dataset-level assignment, for ids seen on valid pixels."""
        assigned = _assign(self._hist)
        used = self._hist.sum(axis=0) > 0
        return {j: c for c, j in enumerate(assigned.tolist()) if j < self.max_pred_ids and used[j]}

    def result(self) -> HungarianScores:
        """Match once and score everything added so far."""
        assigned = _assign(self._hist)
        tp, fp, fn = _tp_fp_fn(self._hist, assigned)
        return _hungarian_scores(
            self.protocol, tp, fp, fn, int(self._hist.sum()), self._num_images, mapping=self.mapping()
        )

    def merge(self, other: DatasetHungarian) -> DatasetHungarian:
        """Add another accumulator's counts in place and return ``self``."""
        if not isinstance(other, DatasetHungarian):
            raise ConfigError(f"can only merge a DatasetHungarian, got {type(other).__name__}")
        if (other.num_classes, other.max_pred_ids, other.ignore_index) != (
            self.num_classes,
            self.max_pred_ids,
            self.ignore_index,
        ):
            raise ConfigError("cannot merge DatasetHungarian accumulators with different settings")
        self._hist += other._hist
        self._num_images += other._num_images
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {
            "kind": self.protocol,
            "num_classes": self.num_classes,
            "max_pred_ids": self.max_pred_ids,
            "ignore_index": self.ignore_index,
            "matrix": self._hist.tolist(),
            "num_images": self._num_images,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetHungarian:
        """Inverse of :meth:`to_dict`."""
        _check_kind(data, cls.protocol)
        acc = cls(int(data["num_classes"]), int(data["max_pred_ids"]), ignore_index=data["ignore_index"])
        matrix = np.asarray(data["matrix"], dtype=np.int64)
        if matrix.shape != acc._hist.shape:
            raise ConfigError(f"matrix has shape {matrix.shape}, expected {acc._hist.shape}")
        acc._hist[:] = matrix
        acc._num_images = int(data["num_images"])
        return acc


# --------------------------------------------------------------------------------------------
# binary (target) masks


@dataclass(frozen=True)
class BinaryCounts:
    """Pixel counts of a binary prediction; the positive class is the target (e.g. hair)."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: BinaryCounts) -> BinaryCounts:
        return BinaryCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def scores(self) -> BinaryScores:
        """Scores from these counts (a zero denominator gives NaN)."""
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        iou = _ratio(tp, tp + fp + fn)
        iou_bg = _ratio(tn, tn + fp + fn)
        return BinaryScores(
            accuracy=_ratio(tp + tn, tp + fp + fn + tn),
            precision=_ratio(tp, tp + fp),
            recall=_ratio(tp, tp + fn),
            f1=_ratio(2 * tp, 2 * tp + fp + fn),
            iou=iou,
            iou_background=iou_bg,
            miou=_nanmean(np.array([iou, iou_bg])),
        )


@dataclass(frozen=True)
class BinaryScores:
    """Scores of a binary mask against a binary target (positive class = target concept).

    Attributes:
        accuracy: (TP + TN) / all scored pixels.
        precision: TP / (TP + FP).
        recall: TP / (TP + FN).
        f1: 2TP / (2TP + FP + FN).
        iou: foreground IoU, TP / (TP + FP + FN).
        iou_background: background IoU, TN / (TN + FP + FN).
        miou: mean of ``iou`` and ``iou_background`` (METHODS.md §4, [proposal]).

    A ratio with a zero denominator is NaN (e.g. precision of an empty prediction).
    """

    accuracy: float
    precision: float
    recall: float
    f1: float
    iou: float
    iou_background: float
    miou: float

    def to_dict(self) -> dict[str, float | None]:
        """JSON-serialisable form; NaN becomes None."""
        return {k: _json_float(v) for k, v in asdict(self).items()}


def _binary_counts(pred: ArrayLike, target: ArrayLike, ignore_index: int | None) -> BinaryCounts:
    p = _as_numpy(pred)
    t = _as_numpy(target)
    if p.shape != t.shape:
        raise ConfigError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    valid = np.ones(t.shape, dtype=bool) if ignore_index is None else t != ignore_index
    pos_p = (p != 0) & valid
    pos_t = (t != 0) & valid
    tp = int(np.count_nonzero(pos_p & pos_t))
    fp = int(np.count_nonzero(pos_p & ~pos_t))
    fn = int(np.count_nonzero(~pos_p & pos_t))
    tn = int(np.count_nonzero(valid)) - tp - fp - fn
    return BinaryCounts(tp, fp, fn, tn)


def binary_scores(pred: ArrayLike, target: ArrayLike, *, ignore_index: int | None = None) -> BinaryScores:
    """Binary scores of one image.

    Args:
        pred: ``(H, W)`` bool or integer; non-zero = positive (target concept).
        target: ``(H, W)`` bool or integer; non-zero = positive, ``ignore_index`` excluded.
        ignore_index: target value excluded from all counts (None: every pixel counts).

    Returns:
        :class:`BinaryScores` for this image.
    """
    return _binary_counts(pred, target, ignore_index).scores()


@dataclass(frozen=True)
class BinaryResult:
    """Binary scores over a dataset.

    Attributes:
        per_image: each metric averaged over images (primary); images where a metric is
            undefined (NaN) are left out of that metric's mean, see ``undefined``.
        pooled: metrics from the pixel counts summed over all images.
        counts: the pooled counts.
        num_images: images added.
        undefined: per metric, how many images had it undefined.
    """

    per_image: BinaryScores
    pooled: BinaryScores
    counts: BinaryCounts
    num_images: int
    undefined: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "per_image": self.per_image.to_dict(),
            "pooled": self.pooled.to_dict(),
            "counts": asdict(self.counts),
            "num_images": self.num_images,
            "undefined": dict(self.undefined),
        }


class BinaryAccumulator:
    """Accumulates binary scores image by image (METHODS.md §4 Evaluation).

    Keeps each image's counts (four integers), so per-image means (primary) and pooled scores
    can both be computed, and accumulators of shards merge exactly.

    Args:
        ignore_index: target value excluded from all counts (None: every pixel counts).
    """

    def __init__(self, *, ignore_index: int | None = None) -> None:
        self.ignore_index = ignore_index
        self._counts: list[BinaryCounts] = []
        self._ids: list[str | None] = []

    def __len__(self) -> int:
        return len(self._counts)

    def update(self, pred: ArrayLike, target: ArrayLike, *, image_id: str | None = None) -> BinaryScores:
        """Add one image and return its scores.

        Args:
            pred: ``(H, W)`` bool or integer, non-zero = positive.
            target: ``(H, W)`` bool or integer, non-zero = positive.
            image_id: optional id kept with the counts.
        """
        counts = _binary_counts(pred, target, self.ignore_index)
        self._counts.append(counts)
        self._ids.append(image_id)
        return counts.scores()

    def per_image(self) -> list[tuple[str | None, BinaryScores]]:
        """``(image_id, scores)`` for every image added, in order."""
        return [(i, c.scores()) for i, c in zip(self._ids, self._counts, strict=True)]

    def result(self) -> BinaryResult:
        """Per-image means and pooled scores."""
        names = [f.name for f in fields(BinaryScores)]
        per = [asdict(c.scores()) for c in self._counts]
        means = {}
        undefined = {}
        for name in names:
            values = np.array([s[name] for s in per], dtype=np.float64)
            means[name] = _nanmean(values)
            undefined[name] = int(np.isnan(values).sum())
        pooled = BinaryCounts(0, 0, 0, 0)
        for c in self._counts:
            pooled = pooled + c
        return BinaryResult(
            per_image=BinaryScores(**means),
            pooled=pooled.scores(),
            counts=pooled,
            num_images=len(self._counts),
            undefined={k: v for k, v in undefined.items() if v},
        )

    def merge(self, other: BinaryAccumulator) -> BinaryAccumulator:
        """Append another accumulator's images in place and return ``self``."""
        if not isinstance(other, BinaryAccumulator):
            raise ConfigError(f"can only merge a BinaryAccumulator, got {type(other).__name__}")
        if other.ignore_index != self.ignore_index:
            raise ConfigError("cannot merge BinaryAccumulators with different ignore_index")
        self._counts.extend(other._counts)
        self._ids.extend(other._ids)
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (per-image counts)."""
        return {
            "kind": "binary",
            "ignore_index": self.ignore_index,
            "images": [{"id": i, **asdict(c)} for i, c in zip(self._ids, self._counts, strict=True)],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BinaryAccumulator:
        """Inverse of :meth:`to_dict`."""
        _check_kind(data, "binary")
        acc = cls(ignore_index=data.get("ignore_index"))
        for item in data["images"]:
            acc._counts.append(BinaryCounts(int(item["tp"]), int(item["fp"]), int(item["fn"]), int(item["tn"])))
            acc._ids.append(item.get("id"))
        return acc


# --------------------------------------------------------------------------------------------
# mask sets (class-agnostic)


def _as_mask_stack(masks: Any, name: str) -> NDArray[np.bool_]:
    if isinstance(masks, (list, tuple)):
        if not masks:
            return np.zeros((0, 0, 0), dtype=bool)
        arr = np.stack([_as_numpy(m) for m in masks])
    else:
        arr = _as_numpy(masks)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ConfigError(f"{name} must be (N, H, W) masks, got shape {arr.shape}")
    return np.asarray(arr != 0, dtype=np.bool_)


def pairwise_iou(masks_a: ArrayLike, masks_b: ArrayLike, *, valid: ArrayLike | None = None) -> NDArray[np.float64]:
    """IoU of every pair of masks.

    Args:
        masks_a: ``(M, H, W)`` bool (or a list of ``(H, W)``).
        masks_b: ``(N, H, W)`` bool.
        valid: optional ``(H, W)`` bool; pixels outside it are ignored.

    Returns:
        ``(M, N)`` float64; NaN where both masks are empty (within ``valid``).
    """
    a = _as_mask_stack(masks_a, "masks_a")
    b = _as_mask_stack(masks_b, "masks_b")
    if a.shape[0] == 0 or b.shape[0] == 0:
        return np.zeros((a.shape[0], b.shape[0]), dtype=np.float64)
    if a.shape[1:] != b.shape[1:]:
        raise ConfigError(f"mask sizes differ: {a.shape[1:]} and {b.shape[1:]}")
    if valid is not None:
        v = _as_numpy(valid).astype(bool)
        if v.shape != a.shape[1:]:
            raise ConfigError(f"valid has shape {v.shape}, masks are {a.shape[1:]}")
        a = a & v
        b = b & v
    fa = a.reshape(a.shape[0], -1).astype(np.float64)
    fb = b.reshape(b.shape[0], -1).astype(np.float64)
    inter = fa @ fb.T  # exact: integer counts far below 2**53
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return _safe_div(inter, union)


def label_masks(label: ArrayLike, *, ignore_index: int | None = 255) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Split a label map into one mask per id present.

    Args:
        label: ``(H, W)`` integer label map.
        ignore_index: id that gets no mask.

    Returns:
        ``(ids, masks)``: ``(K,)`` int64 sorted ids and ``(K, H, W)`` bool masks.
    """
    lab = _as_labels(label, "label")
    ids = np.unique(lab)
    if ignore_index is not None:
        ids = ids[ids != ignore_index]
    return ids.astype(np.int64), lab[None] == ids[:, None, None]


@dataclass(frozen=True)
class TopNResult:
    """Top-n IoU of one sample (Stillger et al., eq. 4).

    Attributes:
        score: mean of ``ious``; NaN when there is no non-empty reference mask.
        n: the requested n.
        num_refs: references actually used, ``min(n, non-empty references)``; report it
            when it is below ``n``.
        ious: ``(num_refs,)`` float64 best IoU of each used reference, largest reference first.
        ref_indices: ``(num_refs,)`` int64 indices of the used references in the input.
    """

    score: float
    n: int
    num_refs: int
    ious: NDArray[np.float64]
    ref_indices: NDArray[np.int64]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "score": _json_float(self.score),
            "n": self.n,
            "num_refs": self.num_refs,
            "ious": _json_floats(self.ious),
            "ref_indices": self.ref_indices.tolist(),
        }


def top_n_iou(pred_masks: ArrayLike, ref_masks: ArrayLike, n: int) -> TopNResult:
    """Top-n IoU (METHODS.md §5, paper eq. 4): ``(1/n) Σ_m max_B IoU(A_m, B)``.

    The n largest reference masks A_m (by pixel area; ties keep input order; empty references
    are dropped) are each matched to their best-IoU predicted mask B; several references may
    pick the same prediction. With fewer than n references, the available ones are averaged
    and ``num_refs`` says how many ([proposal]). No prediction gives IoU 0.

    Args:
        pred_masks: ``(P, H, W)`` bool predicted masks (e.g. the merged cluster masks).
        ref_masks: ``(R, H, W)`` bool reference masks (e.g. SAM automatic masks).
        n: how many of the largest references to score.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    refs = _as_mask_stack(ref_masks, "ref_masks")
    preds = _as_mask_stack(pred_masks, "pred_masks")
    area = refs.sum(axis=(1, 2))
    order = np.argsort(-area, kind="stable")
    order = order[area[order] > 0][: int(n)].astype(np.int64)
    if order.size == 0:
        return TopNResult(math.nan, int(n), 0, np.zeros(0), order)
    if preds.shape[0] == 0:
        ious = np.zeros(order.size, dtype=np.float64)
    else:
        ious = pairwise_iou(refs[order], preds).max(axis=1)
    return TopNResult(float(ious.mean()), int(n), int(order.size), ious, order)


def best_match_iou(
    pred_masks: ArrayLike, gt_masks: ArrayLike, *, valid: ArrayLike | None = None
) -> NDArray[np.float64]:
    """For each ground-truth mask, the best IoU over predicted masks (METHODS.md §5, real images).

    Semantic GT gives one mask per class present (see :func:`label_masks`), instance GT one
    per instance. The per-image score is the mean of the returned values; the dataset score
    averages images.

    Args:
        pred_masks: ``(P, H, W)`` bool.
        gt_masks: ``(G, H, W)`` bool.
        valid: optional ``(H, W)`` bool; pixels outside it (ignore label) are left out.

    Returns:
        ``(G,)`` float64; 0 when there is no prediction, NaN for a GT mask that is empty
        within ``valid``.
    """
    gts = _as_mask_stack(gt_masks, "gt_masks")
    preds = _as_mask_stack(pred_masks, "pred_masks")
    if gts.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    if valid is not None:
        gts = gts & _as_numpy(valid).astype(bool)
    empty = gts.sum(axis=(1, 2)) == 0
    if preds.shape[0] == 0:
        out = np.zeros(gts.shape[0], dtype=np.float64)
    else:
        out = np.nan_to_num(pairwise_iou(gts, preds, valid=valid), nan=0.0).max(axis=1)
    out[empty] = math.nan
    return out
