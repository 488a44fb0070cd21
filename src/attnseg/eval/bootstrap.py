"""Bootstrap confidence intervals over images for the scores of :mod:`attnseg.eval.metrics`.

Scores that pool counts over a dataset (mIoU from summed TP/FP/FN) are resampled by drawing images with
replacement and re-pooling their counts; per-image scores (best-match IoU, binary IoU) by resampling their
mean. Resampling is a multinomial weight per image, so every replicate is one matrix product.

Example:
    >>> import numpy as np
    >>> tp = np.array([[5, 1], [4, 2]]); fp = np.zeros((2, 2), int); fn = np.ones((2, 2), int)
    >>> est = miou_estimate(tp, fp, fn, n_boot=200, seed=0)
    >>> round(est.value, 3)  # (9/11 + 3/5) / 2
    0.709
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from attnseg.errors import ConfigError

__all__ = ["Estimate", "mean_estimate", "miou_estimate", "paired_miou_difference"]


@dataclass(frozen=True)
class Estimate:
    """A score with its bootstrap interval.

    Attributes:
        value: the score on all images.
        low, high: the percentile interval at ``level``.
        level: the interval's coverage (0.95 by default).
        n: number of images.
        n_boot: bootstrap replicates.
    """

    value: float
    low: float
    high: float
    level: float
    n: int
    n_boot: int

    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        return {
            "value": round(self.value, digits),
            "ci": [round(self.low, digits), round(self.high, digits)],
            "level": self.level,
            "n": self.n,
        }

    def overlaps(self, other: Estimate) -> bool:
        """True when the two intervals share any point."""
        return not (self.low > other.high or other.low > self.high)


def _weights(n: int, n_boot: int, seed: int) -> NDArray[np.float64]:
    if n < 1:
        raise ConfigError("need at least one image to bootstrap")
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")


def _pooled_miou(tp: NDArray[np.float64], fp: NDArray[np.float64], fn: NDArray[np.float64]) -> NDArray[np.float64]:
    """``(..., C)`` pooled counts -> ``(...)`` NaN-mean over classes of TP / (TP + FP + FN)."""
    den = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(den > 0, tp / np.where(den > 0, den, 1), np.nan)
    seen = np.isfinite(iou)
    return np.where(seen.any(-1), np.nansum(iou, -1) / np.maximum(seen.sum(-1), 1), np.nan)


def miou_estimate(
    tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> Estimate:
    """mIoU of per-image counts pooled over images, with a bootstrap interval over images.

    Args:
        tp, fp, fn: ``(N, C)`` per-image, per-class counts (e.g. from :func:`~attnseg.eval.metrics.hungarian_counts`).
        n_boot: bootstrap replicates.
        seed: seed of the resampling.
        level: interval coverage.
    """
    _check_level(level)
    t, p, n = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    if t.ndim != 2 or t.shape != p.shape or t.shape != n.shape:
        raise ConfigError(f"tp, fp, fn must be (N, C) arrays of one shape, got {t.shape}, {p.shape}, {n.shape}")
    value = float(_pooled_miou(t.sum(0), p.sum(0), n.sum(0)))
    w = _weights(t.shape[0], n_boot, seed)
    reps = _pooled_miou(w @ t, w @ p, w @ n)
    lo, hi = np.nanpercentile(reps, [50 * (1 - level), 50 * (1 + level)])
    return Estimate(value, float(lo), float(hi), level, t.shape[0], n_boot)


def mean_estimate(values: ArrayLike, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of per-image scores (NaN entries skipped), with a bootstrap interval over images."""
    _check_level(level)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    ok = np.isfinite(v)
    if not ok.any():
        raise ConfigError("no finite per-image value to average")
    v = v[ok]
    w = _weights(v.size, n_boot, seed)
    reps = w @ v / v.size
    lo, hi = np.percentile(reps, [50 * (1 - level), 50 * (1 + level)])
    return Estimate(float(v.mean()), float(lo), float(hi), level, int(v.size), n_boot)


def paired_miou_difference(
    a: tuple[ArrayLike, ArrayLike, ArrayLike],
    b: tuple[ArrayLike, ArrayLike, ArrayLike],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """mIoU(a) - mIoU(b) on the same images, with a paired bootstrap interval (same resampled images)."""
    _check_level(level)
    ta, pa, na = (np.asarray(x, dtype=np.float64) for x in a)
    tb, pb, nb = (np.asarray(x, dtype=np.float64) for x in b)
    if ta.shape[0] != tb.shape[0]:
        raise ConfigError(f"paired scores need the same images, got {ta.shape[0]} and {tb.shape[0]}")
    value = float(_pooled_miou(ta.sum(0), pa.sum(0), na.sum(0)) - _pooled_miou(tb.sum(0), pb.sum(0), nb.sum(0)))
    w = _weights(ta.shape[0], n_boot, seed)
    reps = _pooled_miou(w @ ta, w @ pa, w @ na) - _pooled_miou(w @ tb, w @ pb, w @ nb)
    lo, hi = np.nanpercentile(reps, [50 * (1 - level), 50 * (1 + level)])
    return Estimate(value, float(lo), float(hi), level, ta.shape[0], n_boot)
