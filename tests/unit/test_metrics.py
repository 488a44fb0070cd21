"""Metrics on tiny arrays whose expected values are computed by hand in the comments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from attnseg.errors import AttnSegError, ConfigError
from attnseg.eval.metrics import (
    BinaryAccumulator,
    ConfusionMatrix,
    DatasetHungarian,
    PerImageHungarian,
    best_match_iou,
    binary_scores,
    hungarian_counts,
    hungarian_match,
    label_masks,
    pairwise_iou,
    top_n_iou,
)

# ---------------------------------------------------------------------------------------------
# ConfusionMatrix

PRED = np.array([[0, 0, 1], [1, 2, 2]])
TARGET = np.array([[0, 1, 1], [1, 255, 2]])
# valid (target, pred) pairs: (0,0) (1,0) (1,1) (1,1) (2,2); the 255 pixel is ignored.


def test_confusion_matrix_by_hand() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    # rows = target, cols = pred
    assert cm.matrix.tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]
    assert cm.matrix.dtype == np.int64
    assert cm.num_pixels == 5
    # IoU_0 = 1 / (1 + FP 1 + FN 0) = 1/2; IoU_1 = 2 / (2 + 0 + 1) = 2/3; IoU_2 = 1/1
    np.testing.assert_allclose(cm.iou(), [0.5, 2 / 3, 1.0])
    # mIoU = (1/2 + 2/3 + 1) / 3 = 13/18
    assert cm.miou() == pytest.approx(13 / 18)
    # accuracy = (1 + 2 + 1) / 5
    assert cm.pixel_accuracy() == pytest.approx(0.8)
    # per-class recall: 1/1, 2/3, 1/1
    np.testing.assert_allclose(cm.class_accuracy(), [1.0, 2 / 3, 1.0])


def test_absent_class_nan_vs_goca_zero() -> None:
    cm = ConfusionMatrix(4)  # class 3 never appears in target nor prediction
    cm.update(PRED, TARGET)
    iou = cm.iou()
    assert math.isnan(iou[3])
    # nanmean skips class 3: (1/2 + 2/3 + 1) / 3 = 13/18
    assert cm.miou() == pytest.approx(13 / 18)
    # GoCA: IoU = I / (U + 1e-8), class 3 -> 0, mean over all 4: (1/2 + 2/3 + 1 + 0) / 4 = 13/24
    assert cm.miou_absent_as_zero() == pytest.approx(13 / 24, abs=1e-7)
    assert cm.iou_absent_as_zero()[3] == 0.0


def test_pred_ids_beyond_num_classes_are_wrong() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.array([[7, 0]]), np.array([[0, 0]]))
    # the id-7 pixel is a false negative of class 0 and a false positive of nothing
    assert cm.matrix.tolist() == [[1, 0], [0, 0]]
    assert cm.out_of_range.tolist() == [1, 0]
    # IoU_0 = 1 / (1 TP + 0 FP + 1 FN) = 1/2; class 1 absent -> NaN
    assert cm.iou()[0] == pytest.approx(0.5)
    assert math.isnan(cm.iou()[1])
    assert cm.pixel_accuracy() == pytest.approx(0.5)


def test_ignore_index_none_and_custom() -> None:
    cm = ConfusionMatrix(2, ignore_index=None)
    with pytest.raises(ConfigError, match="outside"):
        cm.update(np.array([[0, 1]]), np.array([[0, 255]]))
    cm = ConfusionMatrix(2, ignore_index=-1)
    cm.update(np.array([[0, 1]]), np.array([[0, -1]]))
    assert cm.num_pixels == 1


def test_bad_inputs_raise_attnseg_errors() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ConfigError, match="label 5"):
        cm.update(np.zeros((1, 2), int), np.array([[5, 0]]))
    with pytest.raises(ConfigError, match="same shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ConfigError, match="non-negative"):
        cm.update(np.array([[-1]]), np.array([[0]]))
    with pytest.raises(ConfigError, match="integer"):
        cm.update(np.zeros((1, 1), float), np.zeros((1, 1), int))
    with pytest.raises(AttnSegError):
        ConfusionMatrix(0)


def test_torch_tensors_accepted() -> None:
    torch = pytest.importorskip("torch")
    cm = ConfusionMatrix(3)
    cm.update(torch.from_numpy(PRED), torch.from_numpy(TARGET))
    assert cm.matrix.tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]


def test_confusion_merge_equals_one_pass_and_json_roundtrip() -> None:
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 5, size=(4, 6, 7))
    targets = rng.integers(0, 4, size=(4, 6, 7))
    targets[targets == 3] = 255
    one = ConfusionMatrix(4)
    for p, t in zip(preds, targets, strict=True):
        one.update(p, t)
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    for p, t in zip(preds[:2], targets[:2], strict=True):
        a.update(p, t)
    for p, t in zip(preds[2:], targets[2:], strict=True):
        b.update(p, t)
    merged = ConfusionMatrix.from_dict(json.loads(json.dumps(a.to_dict()))).merge(b)
    np.testing.assert_array_equal(merged.matrix, one.matrix)
    np.testing.assert_array_equal(merged.out_of_range, one.out_of_range)
    assert merged.miou() == one.miou()
    with pytest.raises(ConfigError):
        one.merge(ConfusionMatrix(5))


# ---------------------------------------------------------------------------------------------
# Hungarian matching

# Two images, 2 classes, segment ids 5 and 6.
# image A: target [[0,0,0],[1,1,1]], pred [[5,5,5],[6,6,6]]   (perfect with 5->0, 6->1)
# image B: target [[0,0,0],[1,1,1]], pred [[6,6,6],[5,5,6]]
IMG_A = (np.array([[5, 5, 5], [6, 6, 6]]), np.array([[0, 0, 0], [1, 1, 1]]))
IMG_B = (np.array([[6, 6, 6], [5, 5, 6]]), np.array([[0, 0, 0], [1, 1, 1]]))


def test_per_image_hungarian_by_hand() -> None:
    acc = PerImageHungarian(2)
    assert acc.update(*IMG_A) == {5: 0, 6: 1}
    # image B hist: class 0 -> {6: 3}; class 1 -> {5: 2, 6: 1}
    #   6->0, 5->1 scores 3 + 2 = 5 (the other way 0 + 1 = 1)
    #   TP = [3, 2]; FN = [0, 1]; FP_0 = colsum(6) - 3 = 4 - 3 = 1; FP_1 = colsum(5) - 2 = 0
    assert acc.update(*IMG_B) == {6: 0, 5: 1}
    r = acc.result()
    # totals: TP = [3+3, 3+2] = [6, 5], FP = [1, 0], FN = [0, 1]
    assert r.tp.tolist() == [6, 5]
    assert r.fp.tolist() == [1, 0]
    assert r.fn.tolist() == [0, 1]
    # IoU_0 = 6/7, IoU_1 = 5/6; Acc = 11/12
    np.testing.assert_allclose(r.iou, [6 / 7, 5 / 6])
    assert r.miou == pytest.approx((6 / 7 + 5 / 6) / 2)
    assert r.accuracy == pytest.approx(11 / 12)
    assert (r.num_pixels, r.num_images) == (12, 2)


def test_dataset_hungarian_by_hand_is_stricter() -> None:
    acc = DatasetHungarian(2, max_pred_ids=7)
    acc.update(*IMG_A)
    acc.update(*IMG_B)
    # accumulated: class 0 -> {5: 3, 6: 3}; class 1 -> {5: 2, 6: 3 + 1 = 4}
    #   5->0, 6->1 scores 3 + 4 = 7 (the other way 3 + 2 = 5)
    assert acc.mapping() == {5: 0, 6: 1}
    r = acc.result()
    # TP = [3, 4]; FN = [6-3, 6-4] = [3, 2]; FP_0 = colsum(5) - 3 = 5 - 3 = 2; FP_1 = colsum(6) - 4 = 7 - 4 = 3
    assert r.tp.tolist() == [3, 4]
    assert r.fn.tolist() == [3, 2]
    assert r.fp.tolist() == [2, 3]
    # IoU_0 = 3/8, IoU_1 = 4/9, Acc = 7/12
    np.testing.assert_allclose(r.iou, [3 / 8, 4 / 9])
    assert r.miou == pytest.approx((3 / 8 + 4 / 9) / 2)
    assert r.accuracy == pytest.approx(7 / 12)
    per_image = PerImageHungarian(2)
    per_image.update(*IMG_A)
    per_image.update(*IMG_B)
    assert r.miou < per_image.result().miou
    with pytest.raises(ConfigError, match="max_pred_ids"):
        acc.update(np.array([[7]]), np.array([[0]]))


def test_unmatched_segments_add_no_false_positives() -> None:
    # target [[0,0],[0,1]], pred [[1,1],[2,3]]: hist class 0 -> {1: 2, 2: 1}, class 1 -> {3: 1}
    # best: 1->0 (2), 3->1 (1); segment 2 unmatched
    pred, target = np.array([[1, 1], [2, 3]]), np.array([[0, 0], [0, 1]])
    assert hungarian_match(pred, target, 2) == {1: 0, 3: 1}
    acc = PerImageHungarian(2)
    acc.update(pred, target)
    r = acc.result()
    # TP = [2, 1], FN = [1, 0] (the segment-2 pixel), FP = [0, 0]
    assert (r.tp.tolist(), r.fn.tolist(), r.fp.tolist()) == ([2, 1], [1, 0], [0, 0])
    np.testing.assert_allclose(r.iou, [2 / 3, 1.0])
    assert r.accuracy == pytest.approx(3 / 4)


def test_hungarian_ignore_index_and_absent_class() -> None:
    # segment 9 covers only ignored pixels: not counted, absent from the mapping
    pred = np.array([[0, 0, 9], [1, 1, 9]])
    target = np.array([[2, 2, 255], [0, 0, 255]])
    assert hungarian_match(pred, target, 3) == {0: 2, 1: 0}
    acc = PerImageHungarian(3)
    acc.update(pred, target)
    r = acc.result()
    assert r.num_pixels == 4
    # class 1 absent from target and not matched to a used segment: NaN, skipped by the mean
    assert math.isnan(r.iou[1])
    assert r.miou == pytest.approx(1.0)
    assert r.accuracy == pytest.approx(1.0)


def test_hungarian_large_ids_are_compacted() -> None:
    pred = np.array([[10**7, 10**7], [3, 3]])
    target = np.array([[1, 1], [0, 0]])
    assert hungarian_match(pred, target, 2) == {10**7: 1, 3: 0}


def test_hungarian_merge_and_json() -> None:
    one = PerImageHungarian(2)
    one.update(*IMG_A)
    one.update(*IMG_B)
    a, b = PerImageHungarian(2), PerImageHungarian(2)
    a.update(*IMG_A)
    b.update(*IMG_B)
    merged = PerImageHungarian.from_dict(json.loads(json.dumps(a.to_dict()))).merge(b)
    assert merged.result().to_dict() == one.result().to_dict()

    d_one = DatasetHungarian(2, 7)
    d_one.update(*IMG_A)
    d_one.update(*IMG_B)
    da, db = DatasetHungarian(2, 7), DatasetHungarian(2, 7)
    da.update(*IMG_A)
    db.update(*IMG_B)
    d_merged = DatasetHungarian.from_dict(json.loads(json.dumps(da.to_dict()))).merge(db)
    assert d_merged.result().to_dict() == d_one.result().to_dict()
    json.dumps(d_one.result().to_dict())
    with pytest.raises(ConfigError):
        PerImageHungarian.from_dict(da.to_dict())


# ---------------------------------------------------------------------------------------------
# binary

B_PRED = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
B_TARGET = np.array([[1, 0, 0, 0], [1, 1, 0, 0]])
# TP = 2 ((0,0), (1,0)), FP = 1 ((0,1)), FN = 1 ((1,1)), TN = 8 - 4 = 4


def test_binary_scores_by_hand() -> None:
    s = binary_scores(B_PRED, B_TARGET)
    assert s.accuracy == pytest.approx(6 / 8)  # (TP + TN) / all
    assert s.precision == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert s.recall == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert s.f1 == pytest.approx(4 / 6)  # 2*2 / (2*2 + 1 + 1)
    assert s.iou == pytest.approx(2 / 4)  # 2 / (2 + 1 + 1)
    assert s.iou_background == pytest.approx(4 / 6)  # 4 / (4 + 1 + 1)
    assert s.miou == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_binary_accumulator_per_image_and_pooled() -> None:
    acc = BinaryAccumulator()
    acc.update(B_PRED, B_TARGET, image_id="a")
    # image b: pred empty, target [[1, 0]] -> TP 0, FP 0, FN 1, TN 1; precision 0/0 = NaN
    s_b = acc.update(np.zeros((1, 2), bool), np.array([[1, 0]]), image_id="b")
    assert math.isnan(s_b.precision) and s_b.f1 == 0.0 and s_b.iou_background == 0.5
    r = acc.result()
    assert r.per_image.accuracy == pytest.approx((0.75 + 0.5) / 2)
    assert r.per_image.precision == pytest.approx(2 / 3)  # image b left out of the mean
    assert r.undefined == {"precision": 1}
    # pooled counts: TP 2, FP 1, FN 2, TN 5
    assert (r.counts.tp, r.counts.fp, r.counts.fn, r.counts.tn) == (2, 1, 2, 5)
    assert r.pooled.recall == pytest.approx(2 / 4)
    assert r.pooled.f1 == pytest.approx(4 / 7)
    assert r.pooled.iou == pytest.approx(2 / 5)
    assert r.pooled.iou_background == pytest.approx(5 / 8)
    # merge of halves equals one pass, through JSON
    a, b = BinaryAccumulator(), BinaryAccumulator()
    a.update(B_PRED, B_TARGET, image_id="a")
    b.update(np.zeros((1, 2), bool), np.array([[1, 0]]), image_id="b")
    merged = BinaryAccumulator.from_dict(json.loads(json.dumps(a.to_dict()))).merge(b)
    assert merged.result() == r
    assert [i for i, _ in merged.per_image()] == ["a", "b"]
    json.dumps(r.to_dict())


def test_binary_ignore_index() -> None:
    s = binary_scores(np.array([[1, 1]]), np.array([[1, 255]]), ignore_index=255)
    assert s.precision == 1.0 and s.accuracy == 1.0


# ---------------------------------------------------------------------------------------------
# mask sets

REF_A = np.array([[1, 1, 1, 1, 0, 0, 0, 0]], bool)  # area 4
REF_B = np.array([[0, 0, 0, 0, 1, 1, 0, 0]], bool)  # area 2
REF_C = np.array([[0, 0, 0, 0, 0, 0, 0, 1]], bool)  # area 1
PRED_1 = np.array([[1, 1, 0, 0, 0, 0, 0, 0]], bool)
PRED_2 = np.array([[0, 0, 0, 0, 1, 1, 1, 1]], bool)


def test_pairwise_iou() -> None:
    iou = pairwise_iou(np.stack([REF_A, REF_B]), np.stack([PRED_1, PRED_2]))
    # A∩P1 = 2, A∪P1 = 4; B∩P2 = 2, B∪P2 = 4
    np.testing.assert_allclose(iou, [[0.5, 0.0], [0.0, 0.5]])


def test_top_n_iou_largest_references() -> None:
    refs = np.stack([REF_C, REF_A, REF_B])  # unsorted on purpose
    preds = np.stack([PRED_1, PRED_2])
    r = top_n_iou(preds, refs, 2)
    # the two largest refs are A (best 0.5 with P1) and B (best 0.5 with P2)
    assert r.ref_indices.tolist() == [1, 2]
    assert r.score == pytest.approx(0.5)
    assert r.num_refs == 2


def test_top_n_iou_fewer_references_than_n() -> None:
    refs = np.stack([REF_C, REF_A, REF_B])
    r = top_n_iou(np.stack([PRED_1, PRED_2]), refs, 5)
    # C's best is P2: 1 / 4; mean of the 3 available = (0.5 + 0.5 + 0.25) / 3
    assert r.num_refs == 3 and r.n == 5
    assert r.score == pytest.approx(1.25 / 3)
    np.testing.assert_allclose(r.ious, [0.5, 0.5, 0.25])
    empty = top_n_iou(np.stack([PRED_1]), np.zeros((0, 1, 8), bool), 3)
    assert math.isnan(empty.score) and empty.num_refs == 0
    no_pred = top_n_iou(np.zeros((0, 1, 8), bool), refs, 1)
    assert no_pred.score == 0.0


def test_best_match_iou_with_label_masks() -> None:
    label = np.array([[0, 0, 1, 1], [0, 255, 1, 1]])
    ids, gt = label_masks(label)
    assert ids.tolist() == [0, 1]
    pred = np.array([[0, 0, 0, 1], [0, 0, 1, 1]])  # segment ids
    _, pred_masks = label_masks(pred)
    valid = label != 255
    ious = best_match_iou(pred_masks, gt, valid=valid)
    # class 0 (3 px) vs segment 0 (4 valid px; its 5th pixel is ignored): I 3, U 4
    # class 1 (4 px) vs segment 1 (3 px): I 3, U 4
    np.testing.assert_allclose(ious, [0.75, 0.75])
    assert best_match_iou(np.zeros((0, 2, 4), bool), gt).tolist() == [0.0, 0.0]


def test_per_image_assignment_is_optimal_brute_force() -> None:
    """The matched TP total equals the best over all injective class -> segment assignments."""
    import itertools

    rng = np.random.default_rng(3)
    for _ in range(20):
        target = rng.integers(0, 3, size=(5, 5))
        pred = rng.integers(0, 4, size=(5, 5))
        hist = np.zeros((3, 4), int)
        np.add.at(hist, (target.ravel(), pred.ravel()), 1)
        best = max(sum(hist[c, cols[c]] for c in range(3)) for cols in itertools.permutations(range(4), 3))
        acc = PerImageHungarian(3)
        mapping = acc.update(pred, target)
        assert acc.result().tp.sum() == best
        assert sum(hist[c, s] for s, c in mapping.items()) == best


# ---------------------------------------------------------------------------------------------
# serialised forms, dtypes and single-pixel segments


def test_label_masks_ids_are_int64() -> None:
    ids, masks = label_masks(np.array([[3, 3, 255], [0, 3, 0]]))
    assert ids.dtype == np.int64 and ids.tolist() == [0, 3]
    assert masks.dtype == np.bool_ and masks.sum(axis=(1, 2)).tolist() == [2, 3]
    ids, _ = label_masks(np.array([[1, 255]]), ignore_index=None)
    assert ids.tolist() == [1, 255]


def test_a_segment_of_one_pixel_is_matched() -> None:
    # target [[0, 0, 1]], pred [[4, 4, 7]]: segment 7 covers one pixel of class 1
    pred, target = np.array([[4, 4, 7]]), np.array([[0, 0, 1]])
    assert hungarian_match(pred, target, 2) == {4: 0, 7: 1}
    assert PerImageHungarian(2).update(pred, target) == {4: 0, 7: 1}
    acc = DatasetHungarian(2, max_pred_ids=8)
    acc.update(pred, target)
    assert acc.mapping() == {4: 0, 7: 1}


def test_serialised_scores_hold_the_values() -> None:
    acc = PerImageHungarian(2)
    acc.update(*IMG_A)
    acc.update(*IMG_B)
    r = acc.result()
    d = r.to_dict()
    assert d == {"protocol": "per-image-hungarian", "accuracy": r.accuracy, "miou": r.miou, "iou": r.iou.tolist(),
                 "tp": [6, 5], "fp": [1, 0], "fn": [0, 1], "num_pixels": 12, "num_images": 2, "mapping": None}
    d_acc = DatasetHungarian(2, 7)
    d_acc.update(*IMG_A)
    assert d_acc.result().to_dict()["mapping"] == {"5": 0, "6": 1}
    nan = PerImageHungarian(2).result().to_dict()
    assert nan["miou"] is None and nan["accuracy"] is None and nan["iou"] == [None, None]
    top = top_n_iou(np.stack([PRED_1, PRED_2]), np.stack([REF_C, REF_A, REF_B]), 5)
    assert top.to_dict() == {"score": 1.25 / 3, "n": 5, "num_refs": 3, "ious": [0.5, 0.5, 0.25],
                             "ref_indices": [1, 2, 0]}
    assert top_n_iou(np.stack([PRED_1]), np.zeros((0, 1, 8), bool), 2).to_dict()["score"] is None
    s = binary_scores(B_PRED, B_TARGET).to_dict()
    assert s == {"accuracy": 0.75, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "iou": 0.5,
                 "iou_background": 2 / 3, "miou": (0.5 + 2 / 3) / 2}
    assert binary_scores(np.zeros((1, 2), bool), np.zeros((1, 2), int)).to_dict()["precision"] is None


# ---------------------------------------------------------------------------------------------
# edges: ignored pixels, round trips of every option, counts' dtypes, messages


def test_binary_counts_leave_ignored_pixels_out() -> None:
    # pixels: (pred 1, target 1) TP; (0, 255) ignored; (0, 0) TN; (1, 255) ignored
    acc = BinaryAccumulator(ignore_index=255)
    acc.update(np.array([[1, 0, 0, 1]]), np.array([[1, 255, 0, 255]]))
    counts = acc.result().counts
    assert (counts.tp, counts.fp, counts.fn, counts.tn) == (1, 0, 0, 1)


def test_binary_accumulator_round_trip_keeps_ignore_index() -> None:
    acc = BinaryAccumulator(ignore_index=255)
    acc.update(B_PRED, B_TARGET, image_id="a")
    d = json.loads(json.dumps(acc.to_dict()))
    assert d["ignore_index"] == 255
    back = BinaryAccumulator.from_dict(d)
    assert back.ignore_index == 255
    back.update(np.array([[1]]), np.array([[255]]))  # ignored: nothing is counted
    assert back.result().counts == acc.result().counts


def test_per_image_hungarian_round_trip_keeps_present_only() -> None:
    acc = PerImageHungarian(3, present_only=True)
    acc.update(np.array([[0, 0, 1]]), np.array([[0, 0, 1]]))
    back = PerImageHungarian.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert back.present_only is True
    # only present classes are matched, so merging with the original is allowed and counts add up
    assert back.merge(acc).result().tp.tolist() == [4, 2, 0]


def test_hungarian_counts_by_hand() -> None:
    # target [[0,0],[0,1]], pred [[1,1],[2,3]]: 1->0 (2 px), 3->1 (1 px), segment 2 unmatched
    tp, fp, fn = hungarian_counts(np.array([[1, 1], [2, 3]]), np.array([[0, 0], [0, 1]]), 2)
    assert (tp.tolist(), fp.tolist(), fn.tolist()) == ([2, 1], [0, 0], [1, 0])
    # all classes: absent class 2 is matched to a segment and charged its pixels; present_only leaves it out
    pred, target = np.array([[0, 0, 1]]), np.array([[0, 0, 0]])
    assert [x.tolist() for x in hungarian_counts(pred, target, 2)] == [[2, 0], [0, 1], [1, 0]]
    assert [x.tolist() for x in hungarian_counts(pred, target, 2, present_only=True)] == [[2, 0], [0, 0], [1, 0]]
    with pytest.raises(ConfigError):
        hungarian_counts(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)


def test_hungarian_hist_pads_compacted_columns_with_minus_one() -> None:
    from attnseg.eval.metrics import _hungarian_hist

    # ids beyond the dense limit are compacted to the ids present: [3, 10**7], padded to num_classes = 4 columns
    pred, target = np.array([[10**7, 3]]), np.array([[1, 0]])
    hist, col_ids = _hungarian_hist(pred, target, 4, None)
    assert col_ids.tolist() == [3, 10**7, -1, -1]
    assert hist.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_out_of_range_counts_are_int64() -> None:
    cm = ConfusionMatrix(2)
    assert cm.out_of_range.dtype == np.int64
    cm.update(np.array([[5, 0]]), np.array([[1, 0]]))
    assert cm.out_of_range.dtype == np.int64 and cm.out_of_range.tolist() == [0, 1]
    assert cm.to_dict()["out_of_range"] == [0, 1] and all(type(x) is int for x in cm.to_dict()["out_of_range"])


def test_dataset_hungarian_result_names_its_protocol() -> None:
    acc = DatasetHungarian(2, 7)
    acc.update(*IMG_A)
    assert acc.result().protocol == "dataset-hungarian"
    assert acc.result().to_dict()["protocol"] == "dataset-hungarian"


def test_mask_set_errors_name_the_argument() -> None:
    masks = np.zeros((1, 2, 2), bool)
    with pytest.raises(ConfigError, match=r"^masks_b must be"):
        pairwise_iou(masks, np.zeros(4, bool))
    with pytest.raises(ConfigError, match=r"^gt_masks must be"):
        best_match_iou(masks, np.zeros(4, bool))
    with pytest.raises(ConfigError, match=r"^pred_masks must be"):
        best_match_iou(np.zeros(4, bool), masks)


def test_plain_python_lists_are_accepted() -> None:
    s = binary_scores([[1, 1, 0, 0], [1, 0, 0, 0]], [[1, 0, 0, 0], [1, 1, 0, 0]])
    assert s.iou == pytest.approx(2 / 4)  # as test_binary_scores_by_hand
    cm = ConfusionMatrix(3)
    cm.update(PRED.tolist(), TARGET.tolist())
    assert cm.matrix.tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]


def test_label_errors_name_the_argument() -> None:
    with pytest.raises(ConfigError, match=r"^pred must be an integer label map"):
        ConfusionMatrix(2).update(np.zeros((1, 2)), np.zeros((1, 2), int))
    with pytest.raises(ConfigError, match=r"^target must be an integer label map"):
        ConfusionMatrix(2).update(np.zeros((1, 2), int), np.zeros((1, 2)))


def test_hungarian_counts_ignore_255_by_default() -> None:
    # the 255 pixel would be a third class-0 pixel... it is ignored: TP 1 + 1, nothing else
    tp, fp, fn = hungarian_counts(np.array([[0, 1, 1]]), np.array([[0, 1, 255]]), 2)
    assert (tp.tolist(), fp.tolist(), fn.tolist()) == ([1, 1], [0, 0], [0, 0])


def test_pairwise_iou_with_no_masks_on_one_side() -> None:
    masks = np.zeros((2, 3, 4), bool)
    assert pairwise_iou(np.zeros((0, 3, 4), bool), masks).shape == (0, 2)
    assert pairwise_iou(masks, np.zeros((0, 3, 4), bool)).shape == (2, 0)


def test_per_image_hungarian_with_present_classes_only() -> None:
    # class 2 is absent; with all classes it is matched to segment 2 and charged its pixel as a false positive
    pred, target = np.array([[0, 0, 1, 2]]), np.array([[0, 0, 1, 1]])
    strict = hungarian_counts(pred, target, 3)
    lenient = hungarian_counts(pred, target, 3, present_only=True)
    assert strict[1].tolist() == [0, 0, 1] and lenient[1].tolist() == [0, 0, 0]
    acc = PerImageHungarian(3, present_only=True)
    acc.update(pred, target)
    r = acc.result()
    assert [r.tp.tolist(), r.fp.tolist(), r.fn.tolist()] == [x.tolist() for x in lenient]
