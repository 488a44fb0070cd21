"""Bootstrap intervals and the present-classes Hungarian rule, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from attnseg.errors import ConfigError
from attnseg.eval.bootstrap import mean_estimate, miou_estimate, paired_miou_difference
from attnseg.eval.metrics import PerImageHungarian, hungarian_counts


def test_present_only_never_charges_absent_classes() -> None:
    # Target: class 0 on the left half, class 1 on the right; class 2 absent. Prediction: three segments,
    # segment 2 cutting a 1-pixel column out of class 1.
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 0, 1, 2], [0, 0, 1, 2]])
    tp, fp, fn = hungarian_counts(pred, target, 3)
    # All classes: absent class 2 takes the left-over segment 2 (2 pixels of FP); class 1 keeps segment 1.
    assert tp.tolist() == [4, 2, 0] and fp.tolist() == [0, 0, 2] and fn.tolist() == [0, 2, 0]
    tp, fp, fn = hungarian_counts(pred, target, 3, present_only=True)
    assert tp.tolist() == [4, 2, 0] and fp.tolist() == [0, 0, 0] and fn.tolist() == [0, 2, 0]
    acc = PerImageHungarian(3, present_only=True)
    assert acc.update(pred, target) == {0: 0, 1: 1}
    r = acc.result()
    assert r.iou[:2].tolist() == [1.0, 0.5] and np.isnan(r.iou[2]) and r.miou == 0.75
    again = PerImageHungarian.from_dict(acc.to_dict())
    assert again.present_only and again.result().miou == 0.75
    with pytest.raises(ConfigError, match="present_only"):
        PerImageHungarian(3).merge(acc)


def test_miou_estimate_value_and_interval() -> None:
    tp = np.array([[5, 1], [4, 2]])
    fp = np.zeros((2, 2), dtype=int)
    fn = np.ones((2, 2), dtype=int)
    est = miou_estimate(tp, fp, fn, n_boot=500, seed=0)
    assert est.value == pytest.approx((9 / 11 + 3 / 5) / 2)
    # Only three resamples exist: {a, a}, {a, b}, {b, b}; the interval lies within their extremes.
    a = (5 / 6 + 1 / 2) / 2
    b = (4 / 5 + 2 / 3) / 2
    assert min(a, b) - 1e-12 <= est.low <= est.value <= est.high <= max(a, b) + 1e-12
    assert est.to_dict()["ci"] == [round(est.low, 4), round(est.high, 4)]


def test_identical_scenes_give_a_degenerate_interval_and_paired_zero() -> None:
    tp = np.tile([[3, 1]], (5, 1))
    fp = np.tile([[1, 0]], (5, 1))
    fn = np.tile([[0, 1]], (5, 1))
    est = miou_estimate(tp, fp, fn, n_boot=100)
    assert est.low == est.high == est.value == pytest.approx((3 / 4 + 1 / 2) / 2)
    diff = paired_miou_difference((tp, fp, fn), (tp, fp, fn), n_boot=100)
    assert diff.value == diff.low == diff.high == 0


def test_mean_estimate_skips_nan_and_covers_the_mean() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, 400)
    est = mean_estimate(np.append(values, np.nan), n_boot=2000, seed=1)
    assert est.n == 400 and est.value == pytest.approx(values.mean())
    half = est.high - est.low
    # The 95% interval of a mean is about 2 * 1.96 * sd / sqrt(n).
    assert half == pytest.approx(2 * 1.96 * values.std() / np.sqrt(400), rel=0.15)
    with pytest.raises(ConfigError):
        mean_estimate([np.nan])
    with pytest.raises(ConfigError):
        miou_estimate(tp=np.ones((2, 2)), fp=np.ones((2, 3)), fn=np.ones((2, 2)))
