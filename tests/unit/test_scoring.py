"""The evaluation runner's scoring, against literal metrics (``tests/reference/metrics_literal.py``).

Scorers (one image -> metrics and counts; many images -> dataset metrics) and the runner's prediction step
(resizing ids, bilinear class scores, background offsets, class look-up) are compared with values computed pixel by
pixel, never with ``attnseg.eval.metrics`` (which the scorers use inside).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from attnseg.eval.report import make_scorer, offset_key
from attnseg.methods.base import METHODS
from attnseg.types import SegmentationResult


def _load(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "reference" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ml = _load("metrics_literal")
dl = _load("diffseg_literal")

C = 4
NAMES = ["background", "a", "b", "c"]
SCORING = {"num_classes": C, "ignore_index": 255, "class_names": NAMES}


def images(seed: int, n: int = 4, k: int = 6, shape=(6, 7)) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random (pred, target) pairs with ignored pixels, whose Hungarian optimum is unique (so FP and FN are defined
    whatever the solver's tie-breaking). Every class is present: for an absent class every column is optimal, and
    which one the solver picks decides that class's false positives."""
    rng = np.random.default_rng(seed)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        target = rng.integers(0, C, shape)
        target[rng.random(shape) < 0.1] = 255
        pred = np.where(rng.random(shape) < 0.6, np.where(target == 255, 0, target) + 1, rng.integers(0, k, shape))
        if ml.hungarian_literal(pred, target, C, 255)["unique"]:
            out.append((pred, target))
    assert len(out) == n
    return out


def close(a, b) -> bool:
    if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return abs(a - b) <= 1e-12


# --------------------------------------------------------------------------------------------
# class-agnostic: per-image Hungarian, dataset Hungarian, best match


def test_per_image_hungarian_scorer_equals_the_exhaustive_search():
    data = images(0)
    scorer = make_scorer({**SCORING, "matching": "per-image-hungarian"})
    records = []
    totals = {"tp": [0] * C, "fp": [0] * C, "fn": [0] * C, "n": 0}
    for i, (p, t) in enumerate(data):
        metrics, counts = scorer.score(p, t)
        ref = ml.hungarian_literal(p, t, C, 255)
        assert counts["hungarian"] == {k: ref[k] for k in ("tp", "fp", "fn", "num_pixels")}
        assert close(metrics["miou"], ref["miou"]) and close(metrics["pixel_accuracy"], ref["accuracy"])
        assert metrics["num_segments"] == len(set(p.ravel().tolist()))
        assert close(metrics["best_match_iou"], ml.nanmean(ml.best_match_literal(
            np.stack([p == k for k in range(p.max() + 1)]), t, C, 255)))
        for key in ("tp", "fp", "fn"):
            totals[key] = [a + b for a, b in zip(totals[key], ref[key], strict=True)]
        totals["n"] += ref["num_pixels"]
        records.append({"id": str(i), "metrics": metrics, "counts": counts})
    metrics, table = scorer.combine(records)
    iou = [ml._ratio(tp, tp + fp + fn) for tp, fp, fn in zip(totals["tp"], totals["fp"], totals["fn"], strict=True)]
    assert close(metrics["miou"], ml.nanmean(iou))
    assert close(metrics["pixel_accuracy"], sum(totals["tp"]) / totals["n"])
    assert metrics["num_pixels"] == totals["n"]
    assert close(metrics["mean_segments_per_image"], float(np.mean([len(set(p.ravel().tolist())) for p, _ in data])))
    assert [row["tp"] for row in table] == totals["tp"] and [row["fp"] for row in table] == totals["fp"]
    assert [row["fn"] for row in table] == totals["fn"] and [row["name"] for row in table] == NAMES
    assert all(close(row["iou"], v) for row, v in zip(table, iou, strict=True))


def test_dataset_hungarian_rescoring_matches_one_search_over_the_summed_histogram():
    data = images(1)
    per_image = make_scorer({**SCORING, "matching": "per-image-hungarian"})
    records = [{"id": str(i), "metrics": m, "counts": c} for i, (m, c) in
               enumerate(per_image.score(p, t) for p, t in data)]
    # the summed histogram, by hand, then one exhaustive search on it
    width = max(C, max(int(p.max()) for p, _ in data) + 1)
    summed = np.zeros((C, width), np.int64)
    for p, t in data:
        summed[:, : p.max() + 1] += np.array(ml.hungarian_literal(p, t, C, 255)["hist"])[:, : p.max() + 1]
    rows, cols = np.nonzero(summed)
    pred = np.repeat(cols, summed[rows, cols])
    target = np.repeat(rows, summed[rows, cols])
    ref = ml.hungarian_literal(pred, target, C, None)
    assert ref["unique"]
    metrics, table = make_scorer({**SCORING, "matching": "dataset-hungarian"}).combine(records)
    assert close(metrics["miou"], ref["miou"]) and close(metrics["pixel_accuracy"], ref["accuracy"])
    assert [row["tp"] for row in table] == ref["tp"] and [row["fp"] for row in table] == ref["fp"]
    assert metrics["mapping"] == {str(k): NAMES[v] for k, v in sorted(ref["mapping"].items()) if summed[:, k].any()}


def test_best_match_scorer_for_label_maps_and_mask_sets():
    data = images(2)
    scorer = make_scorer({**SCORING, "matching": "best-match"})
    rng = np.random.default_rng(5)
    records, per_image, per_class = [], [], {}
    for i, (p, t) in enumerate(data):
        masks = rng.random((3, *t.shape)) > 0.5 if i % 2 else None  # overlapping masks for every other image
        pred = masks if masks is not None else p
        metrics, counts = scorer.score(pred, t)
        ref = ml.best_match_literal(masks if masks is not None else np.stack([p == k for k in range(p.max() + 1)]),
                                    t, C, 255)
        assert close(metrics["best_match_iou"], ml.nanmean(ref))
        present = sorted({v for v in t.ravel().tolist() if v != 255})
        for c, v in zip(present, ref, strict=True):
            per_class.setdefault(c, []).append(v)
        per_image.append(ml.nanmean(ref))
        records.append({"id": str(i), "metrics": metrics, "counts": counts})
    metrics, table = scorer.combine(records)
    assert close(metrics["best_match_iou"], math.fsum(per_image) / len(per_image))
    assert metrics["images_with_masks"] == len(data) and metrics["num_gt_masks"] == sum(map(len, per_class.values()))
    for row in table:
        assert close(row["iou"], ml.nanmean(per_class[row["id"]]) if row["id"] in per_class else math.nan)
        assert row["images"] == len(per_class.get(row["id"], []))
    with pytest.raises(Exception, match="best-match"):
        make_scorer({**SCORING, "matching": "per-image-hungarian"}).score(np.zeros((2, 6, 7), bool), data[0][1])


# --------------------------------------------------------------------------------------------
# semantic and binary


def test_semantic_scorer_with_background_offsets():
    rng = np.random.default_rng(3)
    offsets = [-0.1, 0.0, 0.2]
    data = []
    for _ in range(3):
        t = rng.integers(0, C, (5, 6))
        t[0, 0] = 255
        preds = {offset_key(o): rng.integers(0, C + 1, (5, 6)) for o in offsets}  # id C = "unknown": wrong
        data.append((preds, t))
    for select, primary in (("best", "miou_absent_as_zero"), (offset_key(0.0), "miou"), ("best", "pixel_accuracy")):
        scorer = make_scorer({**SCORING, "matching": "semantic", "offsets": offsets, "select": select,
                              "primary": primary})
        records = []
        for i, (preds, t) in enumerate(data):
            metrics, counts = scorer.score(preds, t)
            for key, pred in preds.items():
                ref = ml.confusion_literal(pred, t, C, 255)
                assert close(metrics["by_offset"][key]["miou"], ref["miou"])
                assert close(metrics["by_offset"][key]["pixel_accuracy"], ref["pixel_accuracy"])
            records.append({"id": str(i), "metrics": metrics, "counts": counts})
        metrics, table = scorer.combine(records)
        pooled = {}
        for key in preds:
            pred_all = np.concatenate([d[0][key].ravel() for d in data])
            t_all = np.concatenate([d[1].ravel() for d in data])
            pooled[key] = ml.confusion_literal(pred_all, t_all, C, 255)
        chosen = max(pooled, key=lambda k: pooled[k][primary]) if select == "best" else select
        ref = pooled[chosen]
        assert metrics["background_offset"] == float(chosen)
        assert metrics["offset_selection"] == ("best on the evaluated data" if select == "best" else "fixed")
        for name in ("miou", "miou_absent_as_zero", "pixel_accuracy", "num_pixels"):
            assert close(metrics[name], ref[name]), name
        assert metrics["offset_sweep"] == pytest.approx({k: v[primary] for k, v in pooled.items()}, abs=1e-12)
        for row in table:
            c = row["id"]
            assert close(row["iou"], ref["iou"][c]) and close(row["recall"], ref["recall"][c])
            assert close(row["iou_absent_as_zero"], ref["intersection"][c] / (ref["union"][c] + 1e-8))
            assert (row["gt_pixels"], row["pred_pixels"]) == (ref["gt"][c], ref["predicted"][c])


def test_binary_scorer_per_image_means_and_pooled():
    rng = np.random.default_rng(4)
    data = []
    for i in range(4):
        t = rng.integers(0, C, (5, 6))
        t[:, 0] = 255
        pred = rng.integers(0, 2, (5, 6)) * (i != 2)  # image 2 predicts nothing: precision undefined there
        data.append((pred, t))
    scorer = make_scorer({**SCORING, "matching": "binary", "positive": 2})
    records, refs = [], []
    for i, (p, t) in enumerate(data):
        metrics, counts = scorer.score(p, t)
        ref = ml.binary_literal(p, t == 2, t != 255)
        assert counts["binary"] == {k: ref[k] for k in ("tp", "fp", "fn", "tn")}
        for name in ("accuracy", "precision", "recall", "f1", "iou", "iou_background", "miou"):
            assert close(metrics[name], ref[name]), name
        refs.append(ref)
        records.append({"id": str(i), "metrics": metrics, "counts": counts})
    metrics, table = scorer.combine(records)
    for name in ("accuracy", "precision", "recall", "f1", "iou", "iou_background", "miou"):
        assert close(metrics[name], ml.nanmean([r[name] for r in refs])), name
    total = {k: sum(r[k] for r in refs) for k in ("tp", "fp", "fn", "tn")}
    pooled = ml.binary_literal(np.array([1] * total["tp"] + [1] * total["fp"] + [0] * (total["fn"] + total["tn"])),
                               np.array([1] * total["tp"] + [0] * total["fp"] + [1] * total["fn"] + [0] * total["tn"]))
    for name in ("accuracy", "precision", "recall", "f1", "iou", "iou_background", "miou"):
        assert close(metrics["pooled"][name], pooled[name]), name
    assert metrics["undefined_images"] == {"precision": 1}
    assert table[0]["name"] == "b" and close(table[0]["iou_pooled"], pooled["iou"])
    assert close(table[1]["iou_pooled"], pooled["iou_background"])


# --------------------------------------------------------------------------------------------
# the runner's prediction step


class Fixed:
    """A registered stand-in whose result the test sets (class names + scores, or ids)."""

    name: ClassVar[str] = "fixed-semantic"
    requires: ClassVar[frozenset] = frozenset({"self"})

    def __init__(self, *, classes=()) -> None:
        self.classes = tuple(classes)

    def run_options(self):  # the run's configuration checks the timestep against the model's schedule
        from attnseg.methods.base import RunOptions

        return RunOptions()


@pytest.fixture()
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(root / "images" / "x.png")
    Image.fromarray(np.zeros((6, 10), np.uint8)).save(root / "labels" / "x.png")
    METHODS.register(Fixed.name)(Fixed)
    yield root
    METHODS.unregister(Fixed.name)


def test_prediction_of_ids_is_a_nearest_resize(data_root, tmp_path, tiny_sd_dir):
    from attnseg.eval.runner import EvaluationRun

    run = EvaluationRun(tmp_path / "r", dataset="generic", root=data_root, method="diffseg", model=str(tiny_sd_dir))
    labels = torch.arange(20).reshape(4, 5) % 7
    pred = run._prediction(SegmentationResult(labels=labels), (6, 10))
    np.testing.assert_array_equal(pred, ml.nearest_resize_literal(labels.numpy(), (6, 10)))
    same = run._prediction(SegmentationResult(labels=labels), (4, 5))
    np.testing.assert_array_equal(same, labels.numpy())


def test_semantic_prediction_upsamples_scores_and_shifts_the_background(data_root, tmp_path, tiny_sd_dir):
    from attnseg.eval.runner import EvaluationRun

    common = {"dataset": "generic", "root": data_root, "method": "fixed-semantic", "model": str(tiny_sd_dir),
              "class_source": "vocabulary"}
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 3, 5, generator=g)  # channels: background, c, "sky" (not a dataset class), a
    names = ("background", "c", "sky", "a")
    result = SegmentationResult(labels=scores.argmax(0), scores=scores, label_names=names)
    lut = np.array([0, 3, 0, 1])  # names -> dataset ids; "sky" counts as background (the dataset has one)
    up = np.stack([dl.bilinear_resize(s.double().numpy(), 6, 10) for s in scores])
    # one fixed offset
    run = EvaluationRun(tmp_path / "a", background_offset=0.15, **common)
    pred = run._prediction(result, (6, 10))
    shifted = up.copy()
    shifted[0] += 0.15
    assert list(pred) == ["0.15"]
    np.testing.assert_array_equal(pred["0.15"], lut[shifted.argmax(0)])
    # no offset
    run = EvaluationRun(tmp_path / "c", **common)
    pred = run._prediction(result, (6, 10))
    np.testing.assert_array_equal(pred["none"], lut[up.argmax(0)])
    # without scores the ids are resized (nearest) and looked up
    ids = torch.tensor([[0, 1, 2, 3, 1]] * 3)
    no_scores = run._prediction(SegmentationResult(labels=ids, label_names=names), (6, 10))
    np.testing.assert_array_equal(no_scores["none"], lut[ml.nearest_resize_literal(ids.numpy(), (6, 10))])
    # nothing to look for: all background
    nothing = run._prediction(None, (6, 10))
    np.testing.assert_array_equal(nothing["none"], np.zeros((6, 10), np.int64))


def test_class_lookup_of_unnamed_ids_and_unknown_names(data_root, tmp_path, tiny_sd_dir):
    from attnseg.eval.runner import EvaluationRun

    run = EvaluationRun(tmp_path / "a", dataset="generic", root=data_root, method="fixed-semantic",
                        model=str(tiny_sd_dir), class_source="vocabulary")
    # ids without names are dataset ids; those >= C are wrong (C)
    assert run._class_lut(SegmentationResult(labels=torch.tensor([[0, 5], [2, 1]]))).tolist() == [0, 1, 2, 3, 4, 4]
    # names beyond the labels' ids; ids beyond the names are wrong
    lut = run._class_lut(SegmentationResult(labels=torch.tensor([[0, 4]]), label_names=("B", "zebra", "a")))
    assert lut.tolist() == [2, 0, 1, 4, 4]


@pytest.mark.parametrize(("width", "height", "size", "box"), [
    (56, 40, (32, 32), (8, 0, 48, 40)),  # wider than square: centre columns
    (40, 56, (32, 32), (0, 8, 40, 48)),
    (41, 40, (32, 32), (0, 0, 40, 40)),  # one column too many: left offset rounds down
    (100, 50, (20, 30), (12, 0, 87, 50)),  # aspect 3:2 -> 75 x 50
    (30, 20, (20, 30), (0, 0, 30, 20)),  # already the aspect ratio
])
def test_crop_box_is_the_centred_box_of_the_input_aspect_ratio(width, height, size, box):
    from attnseg.eval.runner import _crop_box

    assert _crop_box(width, height, size) == box


# --------------------------------------------------------------------------------------------
# edges: empty images, exact integer sums, mask sets at another size, dtypes


def test_histogram_of_an_image_without_valid_pixels_and_its_dtype():
    from attnseg.eval.report import _hist

    empty = _hist(np.array([[3, 1]]), np.array([[255, 255]]), C, 255)  # every pixel ignored: one empty column
    assert empty.shape == (C, 1) and empty.dtype == np.int64 and not empty.any()
    h = _hist(np.array([[2, 0, 2]]), np.array([[1, 1, 255]]), C, 255)  # columns = predicted ids 0..2
    assert h.dtype == np.int64
    assert h.tolist() == [[0, 0, 0], [1, 0, 1], [0, 0, 0], [0, 0, 0]]


def test_semantic_counts_are_summed_as_exact_integers():
    """Counts from many records are summed as integers: no float rounding, even beyond 2^53 pixels."""
    scorer = make_scorer({**SCORING, "matching": "semantic"})
    big = 2**53 + 1  # not a float64
    records = [{"counts": {"confusion": {"none": {"matrix": [[1, 1, 3]], "out_of_range": [[1, big]]}}}},
               {"counts": {"confusion": {"none": {"matrix": [], "out_of_range": [[1, 2]]}}}}]
    metrics, table = scorer.combine(records)
    assert table[1]["gt_pixels"] == 3 + big + 2
    assert metrics["num_pixels"] == 3 + big + 2


def test_best_match_prediction_resizes_a_mask_set(data_root, tmp_path, tiny_sd_dir):
    from attnseg.eval.runner import EvaluationRun

    run = EvaluationRun(tmp_path / "r", dataset="generic", root=data_root, method="diffseg", model=str(tiny_sd_dir),
                        matching="best-match")
    masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    masks[0, :2] = True
    masks[1, :, 3:] = True  # overlaps the first
    result = SegmentationResult(labels=torch.zeros(4, 5, dtype=torch.int64), scores=masks)
    pred = run._prediction(result, (6, 10))
    expected = np.stack([ml.nearest_resize_literal(m.numpy().astype(np.int64), (6, 10)) for m in masks]) == 1
    assert pred.dtype == np.bool_
    np.testing.assert_array_equal(pred, expected)
    np.testing.assert_array_equal(run._prediction(result, (4, 5)), masks.numpy())


def test_nothing_to_segment_is_an_int64_background_map(data_root, tmp_path, tiny_sd_dir):
    from attnseg.eval.runner import EvaluationRun

    run = EvaluationRun(tmp_path / "a", dataset="generic", root=data_root, method="fixed-semantic",
                        model=str(tiny_sd_dir), class_source="vocabulary")
    run.background_id = np.int32(0)  # an id read from an array is a numpy integer, not a Python int
    nothing = run._prediction(None, (3, 4))["none"]
    assert nothing.dtype == np.int64
    np.testing.assert_array_equal(nothing, np.zeros((3, 4), np.int64))


def test_semantic_scorer_without_offsets_and_with_an_unknown_primary_metric():
    t = np.array([[0, 1, 1], [2, 255, 3]])
    pred = np.array([[0, 1, 0], [2, 3, 3]])
    metrics, _ = make_scorer({**SCORING, "matching": "semantic"}).score({"none": pred}, t)
    ref = ml.confusion_literal(pred, t, C, 255)
    assert set(metrics) == {"miou", "pixel_accuracy"}  # one prediction: flat metrics, no "by_offset"
    assert close(metrics["miou"], ref["miou"]) and close(metrics["pixel_accuracy"], ref["pixel_accuracy"])
    # a primary metric the semantic scorer does not know ranks the offsets by mIoU
    preds = {offset_key(0.0): pred, offset_key(0.1): np.zeros_like(pred)}
    scorer = make_scorer({**SCORING, "matching": "semantic", "offsets": [0.0, 0.1], "select": "best",
                          "primary": "best_match_iou"})
    record = {"counts": scorer.score(preds, t)[1]}
    combined, _ = scorer.combine([record])
    sweep = {k: ml.confusion_literal(p, t, C, 255)["miou"] for k, p in preds.items()}
    assert combined["offset_sweep"] == pytest.approx(sweep, abs=1e-12)
    assert combined["background_offset"] == 0.0 and sweep["0.0"] > sweep["0.1"]


def test_float_scores_flagged_as_masks_are_thresholded_at_one_half(data_root, tmp_path, tiny_sd_dir):
    from attnseg.eval.runner import EvaluationRun

    run = EvaluationRun(tmp_path / "r", dataset="generic", root=data_root, method="diffseg", model=str(tiny_sd_dir),
                        matching="best-match")
    scores = torch.tensor([[[0.2, 0.6], [0.5, 0.9]], [[0.51, 0.0], [1.0, 0.49]]])
    flagged = SegmentationResult(labels=torch.zeros(2, 2, dtype=torch.int64), scores=scores,
                                 meta={"scores_are_masks": True})
    np.testing.assert_array_equal(run._prediction(flagged, (2, 2)), scores.numpy() > 0.5)
    plain = SegmentationResult(labels=torch.tensor([[0, 1], [1, 1]]), scores=scores)  # scores, not masks: the labels
    np.testing.assert_array_equal(run._prediction(plain, (2, 2)), np.array([[0, 1], [1, 1]]))


def test_class_lookup_is_int64_whatever_the_ids_are(data_root, tmp_path, tiny_sd_dir):
    from attnseg.eval.runner import EvaluationRun

    run = EvaluationRun(tmp_path / "a", dataset="generic", root=data_root, method="fixed-semantic",
                        model=str(tiny_sd_dir), class_source="vocabulary")
    run.background_id = np.int32(0)  # a numpy integer, as an id read from an array would be
    lut = run._class_lut(SegmentationResult(labels=torch.tensor([[0, 1]]), label_names=("zebra", "sky")))
    assert lut.dtype == np.int64 and lut.tolist() == [0, 0]  # unknown names count as background


def test_nothing_to_segment_without_a_background_class_is_all_wrong(data_root, tmp_path, tiny_sd_dir):
    from attnseg.eval.runner import EvaluationRun

    (data_root / "classes.txt").write_text("a\nb\nc\nd\n")  # no background class
    run = EvaluationRun(tmp_path / "a", dataset="generic", root=data_root, method="fixed-semantic",
                        model=str(tiny_sd_dir), class_source="vocabulary")
    assert run.background_id is None
    nothing = run._prediction(None, (2, 3))["none"]
    np.testing.assert_array_equal(nothing, np.full((2, 3), C))  # id C: scored as wrong
