"""Scoring records and reports of evaluation runs.

An evaluation run (:mod:`attnseg.eval.runner`) appends one JSON line per finished image to
``RUNDIR/results-<rank>.jsonl``. Each line holds the image's **integer counts** for the run's
matching protocol (not just its scores), so that the dataset-level numbers are rebuilt exactly,
whatever the order, the number of processes or the number of restarts:

- ``per-image-hungarian``: the image's TP/FP/FN per class (``PerImageHungarian`` state) and its
  ``(class, predicted id) -> pixels`` histogram;
- ``dataset-hungarian`` / ``best-match``: the same histogram (one assignment over the summed
  histograms / the best-IoU predicted segment per ground-truth class);
- ``semantic``: a sparse confusion matrix per background offset;
- ``binary``: TP/FP/FN/TN.

Records are sorted by their position in the dataset before anything is averaged, so float means
are summed in one fixed order.

:func:`build_report` turns a run folder into ``report.json`` and ``report.md``;
:func:`compare_reports` puts several runs side by side.

Example:
    >>> report = build_report("runs/diffseg-coco")  # doctest: +SKIP
    >>> report["metrics"]["miou"]  # doctest: +SKIP
    0.436
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from attnseg.errors import AttnSegError, ConfigError
from attnseg.io.atomic import write_text_atomic as _write_text_atomic  # patched by fault-injection tests

__all__ = [
    "CONFIG_NAME",
    "REPORT_FORMAT",
    "RESULTS_GLOB",
    "BestMatchScorer",
    "BinaryScorer",
    "HungarianScorer",
    "ResultSet",
    "Scorer",
    "SemanticScorer",
    "append_jsonl",
    "build_report",
    "compare_reports",
    "format_value",
    "make_scorer",
    "read_config",
    "read_jsonl",
    "read_results",
    "render_markdown",
    "scalar_metrics",
    "write_json_atomic",
]

CONFIG_NAME = "config.json"
RESULTS_GLOB = "results-*.jsonl"
REPORT_FORMAT = "attnseg.eval.report"
REPORT_VERSION = 1
RUN_FORMAT = "attnseg.eval.run"

# Largest predicted id kept in a histogram column (ids are compacted by nobody: a method that emits
# ids this large is almost certainly emitting something other than segment ids).
_MAX_PRED_ID = 1 << 16


# --------------------------------------------------------------------------------------------
# small helpers


def _fnum(x: float) -> float | None:
    """JSON-friendly float: NaN and infinities become None."""
    x = float(x)
    return x if math.isfinite(x) else None


def _nanmean(values: Iterable[float | None]) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return math.fsum(finite) / len(finite) if finite else None


def _sparse(matrix: NDArray[np.int64]) -> list[list[int]]:
    """Non-zero entries of a 2-D count matrix as ``[[row, col, count], ...]`` (row-major order)."""
    rows, cols = np.nonzero(matrix)
    return [[int(r), int(c), int(matrix[r, c])] for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]


def _dense(entries: Sequence[Sequence[int]], shape: tuple[int, int]) -> NDArray[np.int64]:
    out = np.zeros(shape, dtype=np.int64)
    for r, c, n in entries:
        out[int(r), int(c)] += int(n)
    return out


def _hist(pred: NDArray[np.int64], target: NDArray[np.int64], num_classes: int, ignore_index: int | None) -> NDArray:
    """``(C, K)`` int64 pixel counts over valid pixels: rows = target class, columns = predicted id."""
    if pred.shape != target.shape:
        raise ConfigError(f"prediction {pred.shape} and label {target.shape} differ in size")
    valid = (target >= 0) & (target < num_classes)
    bad = ~valid if ignore_index is None else ~valid & (target != ignore_index)
    if bad.any():
        raise ConfigError(
            f"label value {int(target[bad][0])} is outside [0, {num_classes}) and is not ignore_index={ignore_index}"
        )
    p = pred[valid].astype(np.int64, copy=False)
    t = target[valid].astype(np.int64, copy=False)
    if p.size and (p.min() < 0 or p.max() >= _MAX_PRED_ID):
        raise ConfigError(f"predicted ids must lie in [0, {_MAX_PRED_ID}), got {int(p.min())}..{int(p.max())}")
    width = int(p.max()) + 1 if p.size else 1
    return np.bincount(t * width + p, minlength=num_classes * width).reshape(num_classes, width).astype(np.int64)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON to ``path`` through a temporary file and ``os.replace`` (:mod:`attnseg.io.atomic`): readers never
    see half a file, and a failed write (a full disk, a kill) leaves the old file or none, never a truncated one."""
    return _write_text_atomic(Path(path), json.dumps(data, indent=2, allow_nan=False) + "\n")


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record as one line to a results file, durably (fsync) and whole: when the write fails part way
    (a full disk), the file is cut back to its previous length, so no half line is left for a resume to read."""
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# scorers: one image -> (metrics, counts); many counts -> dataset metrics


class Scorer:
    """Per-image scoring and exact dataset aggregation for one matching protocol.

    Args:
        num_classes: C, the dataset's classes (ids ``0..C-1``).
        ignore_index: label value that is not scored.
        class_names: ``(C,)`` names, for the per-class table.

    Subclasses implement :meth:`score` (one image, returns JSON-able per-image metrics and the
    integer counts to store) and :meth:`combine` (counts of all images -> metrics + per-class table).
    """

    matching: str = ""
    primary: str = ""

    def __init__(self, num_classes: int, ignore_index: int | None, class_names: Sequence[str]) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        names = list(class_names) or [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ConfigError(f"{len(names)} class names for {self.num_classes} classes")
        self.class_names = names

    def score(self, pred: Any, target: NDArray[np.int64]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Score one image: ``(per-image metrics, counts)``; both JSON-serialisable."""
        raise NotImplementedError

    def combine(self, records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Dataset metrics and the per-class table from the records' counts (records in dataset order)."""
        raise NotImplementedError


def _best_match(hist: NDArray[np.int64]) -> list[list[int]]:
    """Per ground-truth class present: ``[class, intersection, union]`` of its best-IoU predicted id.

    ``hist`` is ``(C, K)`` over valid pixels, so predicted masks are restricted to valid pixels, as
    :func:`attnseg.eval.metrics.best_match_iou` does with ``valid=``. Ties keep the smallest id.
    """
    rows = hist.sum(axis=1)
    cols = hist.sum(axis=0)
    out = []
    for c in np.nonzero(rows)[0].tolist():
        inter = hist[c]
        union = rows[c] + cols - inter
        iou = inter / np.maximum(union, 1)
        j = int(np.argmax(iou))
        out.append([int(c), int(inter[j]), int(union[j])])
    return out


def _best_match_masks(
    masks: NDArray[np.bool_], target: NDArray[np.int64], num_classes: int, ignore_index: int | None
) -> list[list[int]]:
    """:func:`_best_match` for a set of possibly overlapping masks ``(K, H, W)`` bool (e.g. merged cluster masks)."""
    if masks.shape[1:] != target.shape:
        raise ConfigError(f"masks {masks.shape[1:]} and label {target.shape} differ in size")
    _hist(np.zeros(target.shape, np.int64), target, num_classes, ignore_index)  # validates the label
    valid = ((target >= 0) & (target < num_classes)).ravel()
    flat = masks.reshape(masks.shape[0], -1)[:, valid].astype(np.float64)  # (K, N) over valid pixels
    t = target.ravel()[valid]
    areas = flat.sum(axis=1)
    out = []
    for c in np.unique(t).tolist():
        gt = (t == c).astype(np.float64)
        inter = flat @ gt  # exact: integer counts far below 2**53
        union = gt.sum() + areas - inter
        if inter.size == 0:
            out.append([int(c), 0, int(gt.sum())])
            continue
        j = int(np.argmax(inter / np.maximum(union, 1)))
        out.append([int(c), int(inter[j]), int(union[j])])
    return out


class _AgnosticScorer(Scorer):
    """Class-agnostic segment ids (DiffSeg, clustering): every matching stores the same counts.

    Per image: the ``PerImageHungarian`` TP/FP/FN and the sparse ``(class, predicted id) -> pixels``
    histogram over valid pixels. Any class-agnostic matching can be rebuilt from these, so a run can be
    re-scored (``build_report(..., matching=...)``) without running the model again.

    ``pred`` is an ``(H, W)`` int64 map of non-negative segment ids at the label's size, or (best-match only)
    a ``(K, H, W)`` bool set of possibly overlapping masks; for a mask set only the best-match counts
    ``[class, intersection, union]`` are stored.
    """

    def score(self, pred: NDArray[Any], target: NDArray[np.int64]) -> tuple[dict[str, Any], dict[str, Any]]:
        from attnseg.eval.metrics import PerImageHungarian

        if pred.ndim == 3:
            if self.matching != "best-match":
                raise ConfigError(
                    f"{self.matching} matching needs a label map, but the method returned overlapping masks; "
                    "use the best-match matching"
                )
            best = _best_match_masks(pred.astype(bool), target, self.num_classes, self.ignore_index)
            metrics = {"best_match_iou": _nanmean(i / u if u else 0.0 for _, i, u in best),
                       "num_segments": int(pred.shape[0])}
            return metrics, {"best_match": best}
        hist = _hist(pred, target, self.num_classes, self.ignore_index)
        acc = PerImageHungarian(self.num_classes, ignore_index=self.ignore_index)
        acc.update(pred, target)
        res = acc.result()
        state = acc.to_dict()
        best = _best_match(hist)
        metrics = {
            "miou": _fnum(res.miou),
            "pixel_accuracy": _fnum(res.accuracy),
            "best_match_iou": _nanmean(i / u for _, i, u in best),
            "num_segments": int(np.unique(pred).size),
        }
        counts = {"hungarian": {k: state[k] for k in ("tp", "fp", "fn", "num_pixels")}, "hist": _sparse(hist)}
        return metrics, counts


class HungarianScorer(_AgnosticScorer):
    """Segment ids matched to classes by Hungarian matching (DiffSeg / PiCIE).

    Args:
        per_image: True for DiffSeg's per-image assignment (TP/FP/FN summed), False for one assignment
            over the dataset's summed histogram (only meaningful when ids mean the same in every image).
    """

    primary = "miou"

    def __init__(self, num_classes: int, ignore_index: int | None, class_names: Sequence[str], *, per_image: bool):
        super().__init__(num_classes, ignore_index, class_names)
        self.per_image = per_image
        self.matching = "per-image-hungarian" if per_image else "dataset-hungarian"

    def combine(self, records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from attnseg.eval.metrics import DatasetHungarian, PerImageHungarian

        c = self.num_classes
        if any("hist" not in rec["counts"] for rec in records):
            raise ConfigError(
                "this run stored mask sets (best-match counts only); it cannot be scored by Hungarian matching"
            )
        if self.per_image:
            acc = PerImageHungarian(c, ignore_index=self.ignore_index)
            for rec in records:
                state = {"kind": acc.protocol, "num_classes": c, "ignore_index": self.ignore_index, "num_images": 1}
                acc.merge(PerImageHungarian.from_dict({**state, **rec["counts"]["hungarian"]}))
            res = acc.result()
        else:
            width = max([c, *[int(e[1]) + 1 for rec in records for e in rec["counts"]["hist"]]])
            hist = np.zeros((c, width), dtype=np.int64)
            for rec in records:
                hist += _dense(rec["counts"]["hist"], (c, width))
            res = DatasetHungarian.from_dict(
                {"kind": DatasetHungarian.protocol, "num_classes": c, "max_pred_ids": width,
                 "ignore_index": self.ignore_index, "matrix": hist.tolist(), "num_images": len(records)}
            ).result()
        metrics: dict[str, Any] = {
            "miou": _fnum(res.miou),
            "pixel_accuracy": _fnum(res.accuracy),
            "num_pixels": res.num_pixels,
            "mean_segments_per_image": _nanmean(r["metrics"].get("num_segments") for r in records),
        }
        if res.mapping is not None:
            metrics["mapping"] = {str(k): self.class_names[v] for k, v in sorted(res.mapping.items())}
        table = [
            {"id": i, "name": self.class_names[i], "iou": _fnum(res.iou[i]), "tp": int(res.tp[i]),
             "fp": int(res.fp[i]), "fn": int(res.fn[i])}
            for i in range(c)
        ]
        return metrics, table


class BestMatchScorer(_AgnosticScorer):
    """Stillger et al. (real images): for each ground-truth class present, the best-IoU predicted segment.

    Rebuilt from the stored histograms (integers): dataset score = mean over images of the per-image
    mean IoU; per class = mean over the images where the class is present.
    """

    matching = "best-match"
    primary = "best_match_iou"

    def combine(self, records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        c = self.num_classes
        per_image: list[float] = []
        per_class: dict[int, list[float]] = {}
        for rec in records:
            counts = rec["counts"]
            if "best_match" in counts:  # a mask set
                best = counts["best_match"]
            else:
                width = max([1, *[int(e[1]) + 1 for e in counts["hist"]]])
                best = _best_match(_dense(counts["hist"], (c, width)))
            ious = []
            for cls, inter, union in best:
                iou = inter / union if union else 0.0
                ious.append(iou)
                per_class.setdefault(int(cls), []).append(iou)
            if ious:
                per_image.append(math.fsum(ious) / len(ious))
        metrics = {
            "best_match_iou": math.fsum(per_image) / len(per_image) if per_image else None,
            "images_with_masks": len(per_image),
            "num_gt_masks": sum(len(v) for v in per_class.values()),
            "mean_segments_per_image": _nanmean(r["metrics"].get("num_segments") for r in records),
        }
        table = [
            {"id": i, "name": self.class_names[i],
             "iou": math.fsum(per_class[i]) / len(per_class[i]) if i in per_class else None,
             "images": len(per_class.get(i, []))}
            for i in range(c)
        ]
        return metrics, table


class SemanticScorer(Scorer):
    """Predicted ids are dataset class ids (a confusion matrix), optionally for several background offsets.

    Args:
        offsets: background offsets scored (keys of ``pred``); ``None`` for a single prediction keyed ``"none"``.
        select: ``"best"`` (the offset with the best primary metric; tuning or oracle runs) or the key of a
            fixed offset.
        primary: metric that ranks offsets and heads the report (``"miou_absent_as_zero"`` for GoCA).

    ``pred`` is a mapping ``offset key -> (H, W) int64`` class-id map; ids ``>= C`` are counted wrong.
    """

    matching = "semantic"

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None,
        class_names: Sequence[str],
        *,
        offsets: Sequence[float] | None = None,
        select: str = "none",
        primary: str = "miou",
    ) -> None:
        super().__init__(num_classes, ignore_index, class_names)
        self.keys = ["none"] if offsets is None else [offset_key(o) for o in offsets]
        if select != "best" and select not in self.keys:
            raise ConfigError(f"selected background offset {select!r} is not among the scored ones {self.keys}")
        self.select = select
        if primary not in ("miou", "miou_absent_as_zero", "pixel_accuracy"):
            primary = "miou"
        self.primary = primary

    def score(
        self, pred: Mapping[str, NDArray[np.int64]], target: NDArray[np.int64]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from attnseg.eval.metrics import ConfusionMatrix

        confusion: dict[str, Any] = {}
        metrics: dict[str, Any] = {}
        for key in self.keys:
            cm = ConfusionMatrix(self.num_classes, ignore_index=self.ignore_index)
            cm.update(pred[key], target)
            oor = cm.out_of_range
            confusion[key] = {
                "matrix": _sparse(cm.matrix),
                "out_of_range": [[int(i), int(n)] for i, n in enumerate(oor.tolist()) if n],
            }
            metrics[key] = {"miou": _fnum(cm.miou()), "pixel_accuracy": _fnum(cm.pixel_accuracy())}
        flat = metrics["none"] if self.keys == ["none"] else {"by_offset": metrics}
        return flat, {"confusion": confusion}

    def _matrix(self, records: Sequence[Mapping[str, Any]], key: str) -> Any:
        from attnseg.eval.metrics import ConfusionMatrix

        c = self.num_classes
        matrix = np.zeros((c, c), dtype=np.int64)
        oor = np.zeros(c, dtype=np.int64)
        for rec in records:
            entry = rec["counts"]["confusion"][key]
            matrix += _dense(entry["matrix"], (c, c))
            for i, n in entry["out_of_range"]:
                oor[int(i)] += int(n)
        return ConfusionMatrix.from_dict(
            {"kind": "confusion_matrix", "num_classes": c, "ignore_index": self.ignore_index,
             "matrix": matrix.tolist(), "out_of_range": oor.tolist()}
        )

    @staticmethod
    def _scores(cm: Any) -> dict[str, Any]:
        return {
            "miou_absent_as_zero": _fnum(cm.miou_absent_as_zero()),
            "miou": _fnum(cm.miou()),
            "pixel_accuracy": _fnum(cm.pixel_accuracy()),
            "num_pixels": cm.num_pixels,
        }

    def combine(self, records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        matrices = {key: self._matrix(records, key) for key in self.keys}
        scores = {key: self._scores(cm) for key, cm in matrices.items()}
        if self.select == "best":
            def rank(key: str) -> float:
                v = scores[key][self.primary]
                return -math.inf if v is None else v

            chosen = max(self.keys, key=rank)  # first (smallest offset) on ties
        else:
            chosen = self.select
        metrics: dict[str, Any] = dict(scores[chosen])
        if self.keys != ["none"]:
            metrics["background_offset"] = float(chosen)
            metrics["offset_selection"] = "best on the evaluated data" if self.select == "best" else "fixed"
            metrics["offset_sweep"] = {key: scores[key][self.primary] for key in self.keys}
        cm = matrices[chosen]
        iou = cm.iou()
        iou0 = cm.iou_absent_as_zero()
        recall = cm.class_accuracy()
        gt = cm.matrix.sum(axis=1) + cm.out_of_range
        predicted = cm.matrix.sum(axis=0)
        table = [
            {"id": i, "name": self.class_names[i], "iou": _fnum(iou[i]), "iou_absent_as_zero": _fnum(iou0[i]),
             "recall": _fnum(recall[i]), "gt_pixels": int(gt[i]), "pred_pixels": int(predicted[i])}
            for i in range(self.num_classes)
        ]
        return metrics, table


class BinaryScorer(Scorer):
    """One target concept against the rest (e.g. hair); ``pred`` non-zero = positive.

    Args:
        positive: the dataset class id of the target (ground truth ``== positive`` is positive).

    Per-image means are primary (METHODS.md §4, [proposal]); pooled scores are also reported.
    """

    matching = "binary"
    primary = "miou"

    def __init__(self, num_classes: int, ignore_index: int | None, class_names: Sequence[str], *, positive: int):
        super().__init__(num_classes, ignore_index, class_names)
        if not 0 <= positive < self.num_classes:
            raise ConfigError(f"positive class {positive} is not a class id in [0, {self.num_classes})")
        self.positive = int(positive)

    def _binary_target(self, target: NDArray[np.int64]) -> NDArray[np.int64]:
        out = (target == self.positive).astype(np.int64)
        if self.ignore_index is not None:
            out[target == self.ignore_index] = self.ignore_index
        return out

    def score(self, pred: NDArray[np.int64], target: NDArray[np.int64]) -> tuple[dict[str, Any], dict[str, Any]]:
        from attnseg.eval.metrics import BinaryAccumulator

        acc = BinaryAccumulator(ignore_index=self.ignore_index)
        scores = acc.update(pred != 0, self._binary_target(target))
        item = acc.to_dict()["images"][0]
        return scores.to_dict(), {"binary": {k: int(item[k]) for k in ("tp", "fp", "fn", "tn")}}

    def combine(self, records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from attnseg.eval.metrics import BinaryAccumulator

        acc = BinaryAccumulator.from_dict(
            {"kind": "binary", "ignore_index": self.ignore_index,
             "images": [{"id": r["id"], **r["counts"]["binary"]} for r in records]}
        )
        res = acc.result()
        metrics: dict[str, Any] = {**res.per_image.to_dict(), "pooled": res.pooled.to_dict()}
        if res.undefined:
            metrics["undefined_images"] = dict(res.undefined)
        pooled = res.pooled
        table = [
            {"id": self.positive, "name": self.class_names[self.positive], "iou_pooled": _fnum(pooled.iou)},
            {"id": None, "name": "rest (background)", "iou_pooled": _fnum(pooled.iou_background)},
        ]
        return metrics, table


def offset_key(offset: float) -> str:
    """Canonical key of a background offset (``0.1 -> "0.1"``, ``-0.0 -> "0.0"``)."""
    value = round(float(offset), 6) + 0.0
    return repr(value)


def make_scorer(scoring: Mapping[str, Any]) -> Scorer:
    """The scorer described by a run's ``config["scoring"]``.

    Keys: ``matching``, ``num_classes``, ``ignore_index``, ``class_names`` and, by matching,
    ``offsets`` / ``select`` / ``primary`` (semantic) or ``positive`` (binary).
    """
    matching = scoring["matching"]
    common = (int(scoring["num_classes"]), scoring.get("ignore_index"), scoring.get("class_names") or [])
    if matching in ("per-image-hungarian", "dataset-hungarian"):
        return HungarianScorer(*common, per_image=matching == "per-image-hungarian")
    if matching == "best-match":
        return BestMatchScorer(*common)
    if matching == "semantic":
        return SemanticScorer(
            *common, offsets=scoring.get("offsets"), select=scoring.get("select", "none"),
            primary=scoring.get("primary", "miou"),
        )
    if matching == "binary":
        return BinaryScorer(*common, positive=int(scoring["positive"]))
    if matching == "top-n":
        raise ConfigError(
            "matching 'top-n' needs reference masks (SAM or Mask2Former), which the evaluation runner does not "
            "produce; score with attnseg.eval.metrics.top_n_iou directly"
        )
    raise ConfigError(f"unknown matching {matching!r}")


# --------------------------------------------------------------------------------------------
# reading run folders


def _record_problem(rec: Any) -> str | None:
    """Why a parsed line is not a usable result record (None when it is)."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    if not isinstance(rec.get("id"), str):
        return "no string 'id'"
    if isinstance(rec.get("index"), bool) or not isinstance(rec.get("index"), int):
        return "no integer 'index'"
    for key in ("metrics", "counts"):
        if not isinstance(rec.get(key), dict):
            return f"no {key!r} object"
    return None


def read_jsonl(path: str | Path, *, repair: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Read a results file: ``(records, torn)``.

    A last line without its newline (a process killed mid-write) is ignored and counted in ``torn``;
    with ``repair=True`` the file is truncated to its last complete line, so appending can go on.
    A malformed line elsewhere raises :class:`AttnSegError` naming the file and line.
    """
    path = Path(path)
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    torn = 0
    end = data.rfind(b"\n") + 1  # bytes up to the last complete line
    if end < len(data):
        torn = 1
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AttnSegError(f"{path}: line {number} is not valid JSON ({exc.msg}); remove that line") from None
        problem = _record_problem(rec)
        if problem:
            raise AttnSegError(f"{path}: line {number} is not a result record ({problem}); remove that line and "
                               "re-run the same command (the image is evaluated again)")
        records.append(rec)
    return records, torn


def read_config(rundir: str | Path) -> dict[str, Any]:
    """``RUNDIR/config.json`` (raises :class:`AttnSegError` when it is missing or not a run config)."""
    rundir = Path(rundir)
    path = rundir / CONFIG_NAME
    if not rundir.is_dir():
        raise AttnSegError(f"run folder {rundir} does not exist")
    if not path.is_file():
        raise AttnSegError(f"{rundir} is not an evaluation run folder: {path} is missing")
    for attempt in range(20):  # another process may be replacing it right now
        try:
            config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            break
        except json.JSONDecodeError:
            if attempt == 19:
                raise AttnSegError(f"{path} is not valid JSON") from None
            time.sleep(0.05)
    if config.get("format") != RUN_FORMAT:
        raise AttnSegError(f"{path} is not an attnseg evaluation config (format={config.get('format')!r})")
    return config


@dataclass
class ResultSet:
    """The records of a run folder, deduplicated and in dataset order.

    Attributes:
        records: one record per finished image, sorted by ``index``.
        torn: result files whose last line was cut off (ignored).
        duplicates: records dropped because their id was already finished.
        files: the result files read.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    torn: int = 0
    duplicates: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def ids(self) -> set[str]:
        return {r["id"] for r in self.records}


def _rank_of(path: Path) -> int:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return 1 << 30


def read_results(rundir: str | Path, *, ids: Sequence[str] | None = None) -> ResultSet:
    """All records of ``RUNDIR/results-*.jsonl``.

    Args:
        rundir: the run folder.
        ids: the run's ids in order; records of other ids are an error, and ``index`` is checked.

    The first record of an id wins (files in rank order, lines in file order); later ones are counted
    in :attr:`ResultSet.duplicates`.
    """
    rundir = Path(rundir)
    out = ResultSet()
    position = {i: k for k, i in enumerate(ids)} if ids is not None else None
    seen: set[str] = set()
    for path in sorted(rundir.glob(RESULTS_GLOB), key=lambda p: (_rank_of(p), p.name)):
        records, torn = read_jsonl(path)
        out.torn += torn
        out.files.append(path.name)
        for rec in records:
            rid = rec["id"]
            if position is not None:
                if rid not in position:
                    raise AttnSegError(f"{path}: id {rid!r} is not part of this run (was the dataset changed?)")
                if rec.get("index") != position[rid]:
                    raise AttnSegError(f"{path}: id {rid!r} has index {rec.get('index')}, expected {position[rid]}")
            if rid in seen:
                out.duplicates += 1
                continue
            seen.add(rid)
            out.records.append(rec)
    out.records.sort(key=lambda r: (r.get("index", 0), r["id"]))
    return out


# --------------------------------------------------------------------------------------------
# reports


def _timings(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    totals = [float(r["timings"]["total"]) for r in records if "timings" in r]
    stages: dict[str, list[float]] = {}
    for r in records:
        for k, v in (r.get("timings") or {}).items():
            if k != "total" and isinstance(v, (int, float)):
                stages.setdefault(k, []).append(float(v))
    starts = [float(r["started_at"]) for r in records if "started_at" in r]
    ends = [float(r["finished_at"]) for r in records if "finished_at" in r]
    stores: dict[str, int] = {}
    for r in records:
        s = r.get("store")
        if s:
            stores[s] = stores.get(s, 0) + 1
    return {
        "images_seconds": round(math.fsum(totals), 4),
        "per_image_mean": round(statistics.fmean(totals), 4) if totals else None,
        "per_image_median": round(statistics.median(totals), 4) if totals else None,
        "stage_means": {k: round(statistics.fmean(v), 4) for k, v in sorted(stages.items())},
        "first_start": min(starts) if starts else None,
        "last_finish": max(ends) if ends else None,
        "span_seconds": round(max(ends) - min(starts), 3) if starts and ends else None,
        "stores": stores,
    }


def build_report(rundir: str | Path, *, write: bool = True, matching: str | None = None) -> dict[str, Any]:
    """Rebuild the report of a run folder from its config and result files.

    Args:
        rundir: the ``--out`` folder of ``attnseg evaluate``.
        write: also write ``RUNDIR/report.json`` and ``RUNDIR/report.md``.
        matching: re-score a class-agnostic run with another Hungarian/best-match protocol
            (``"per-image-hungarian"``, ``"dataset-hungarian"``, ``"best-match"``); default: the run's.

    Returns:
        The report dict. Deterministic parts (``metrics``, ``per_class``, ``per_image``, counts) are
        identical for any number of processes and restarts; ``timings`` and ``generated_at`` are not.
        ``complete`` is False, and ``missing`` lists the ids, while images are still to be evaluated.
    """
    rundir = Path(rundir)
    config = read_config(rundir)
    ids: list[str] = list(config["ids"])
    results = read_results(rundir, ids=ids)
    records = results.records
    scoring = dict(config["scoring"])
    if matching is not None and matching != scoring["matching"]:
        agnostic = ("per-image-hungarian", "dataset-hungarian", "best-match")
        if scoring["matching"] not in agnostic or matching not in agnostic:
            raise ConfigError(
                f"a {scoring['matching']!r} run can only be re-scored with another class-agnostic matching "
                f"({', '.join(agnostic)}), not {matching!r}"
            )
        scoring["matching"] = matching
    scorer = make_scorer(scoring)
    metrics, table = scorer.combine(records) if records else ({}, [])
    done = {r["id"] for r in records}
    missing = [i for i in ids if i not in done]
    protocol = config.get("protocol") or {}
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "rundir": str(rundir),
        "name": rundir.name,
        "complete": not missing,
        "num_images": len(records),
        "num_expected": len(ids),
        "missing": {"count": len(missing), "ids": missing[:50]},
        "protocol": protocol,
        "matching": scorer.matching,
        "primary_metric": scorer.primary,
        "metrics": metrics,
        "per_class": table,
        "dataset": config["identity"]["dataset"],
        "method": config["identity"]["method"],
        "model": config["identity"]["model"],
        "seed": config["identity"]["seed"],
        "geometry": config["identity"]["geometry"],
        "class_source": config["identity"].get("class_source"),
        "per_image": [{"id": r["id"], **r.get("metrics", {})} for r in records],
        "files": {"results": results.files, "torn_lines": results.torn, "duplicates": results.duplicates},
        "timings": _timings(records),
        "versions": config.get("versions", {}),
        "config": config,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if write:
        write_json_atomic(rundir / "report.json", report)
        _write_text_atomic(rundir / "report.md", render_markdown(report))
    return report


def format_value(value: Any, digits: int = 4) -> str:
    """A metric for a table: 4 decimals for floats, ``n/a`` for None."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar entries of a report's metrics (pooled binary scores flattened as ``pooled_<name>``)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) or v is None:
            out[k] = v
        elif k == "pooled" and isinstance(v, Mapping):
            out.update({f"pooled_{kk}": vv for kk, vv in v.items()})
    return out


def render_markdown(report: Mapping[str, Any]) -> str:
    """A short Markdown summary of a report (what ``report.md`` holds)."""
    ident = report["config"]["identity"]
    protocol = report.get("protocol") or {}
    method = report["method"]
    size = f"{report['model']['size']} px" if report["model"]["size"] else "the model's default size"
    status = "complete" if report["complete"] else f"INCOMPLETE: {report['missing']['count']} image(s) missing"
    lines = [
        f"# Evaluation: {report['name']}",
        "",
        "| | |",
        "|---|---|",
        f"| protocol | `{protocol.get('id', 'custom')}` ({protocol.get('source', '')}) |",
        f"| dataset | {ident['dataset']['name']}, split {ident['dataset']['split'] or 'all'} |",
        f"| images | {report['num_images']} of {report['num_expected']} ({status}) |",
        f"| method | {method['name']} ({method['kind']}) |",
        f"| parameters | `{json.dumps(method['params'], sort_keys=True)}` |",
        f"| model | {report['model']['id']} ({report['model']['dtype']}, input {size}) |",
        f"| seed | {report['seed']} (per image: derived from the seed and the image id) |",
        f"| matching | {report['matching']} |",
        f"| background | {protocol.get('background', 'none')} |",
        f"| class source | {report.get('class_source') or 'none'} |",
        f"| geometry | {report['geometry']['description']} |",
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in scalar_metrics(report["metrics"]).items():
        mark = " **(primary)**" if k == report["primary_metric"] else ""
        lines.append(f"| {k}{mark} | {format_value(v)} |")
    sweep = report["metrics"].get("offset_sweep")
    if sweep:
        lines += ["", "Background offset sweep (" + report["metrics"]["offset_selection"] + "):", ""]
        lines.append("| offset | " + " | ".join(sweep) + " |")
        lines.append("|---|" + "---|" * len(sweep))
        lines.append(f"| {report['primary_metric']} | " + " | ".join(format_value(v) for v in sweep.values()) + " |")
    table = report.get("per_class") or []
    if table:
        cols = [k for k in table[0] if k not in ("id", "name")]
        lines += ["", "## Per class", "", "| id | class | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for row in table:
            cells = " | ".join(format_value(row[c]) for c in cols)
            lines.append(f"| {format_value(row['id'])} | {row['name']} | {cells} |")
    if protocol.get("notes"):
        lines += ["", "## Protocol notes", "", protocol["notes"]]
    t = report["timings"]
    lines += [
        "",
        "## Timings",
        "",
        f"{format_value(t['images_seconds'], 2)} s over {report['num_images']} image(s); per image mean "
        f"{format_value(t['per_image_mean'], 3)} s, median {format_value(t['per_image_median'], 3)} s; stage means "
        + ", ".join(f"{k} {v:.3f} s" for k, v in t["stage_means"].items())
        + (f"; stores: {t['stores']}" if t["stores"] else ""),
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
    ]
    return "\n".join(lines)


def compare_reports(rundirs: Sequence[str | Path], *, reports: Sequence[Mapping[str, Any]] | None = None) -> str:
    """A side-by-side Markdown table of several runs (one column per run).

    Rows: protocol, dataset, method, model, seed, images, the method parameters that differ between runs,
    then every scalar metric (primary first). Reports are rebuilt from the run folders (nothing is written)
    unless given.
    """
    if reports is None:
        reports = [build_report(d, write=False) for d in rundirs]
    if not reports:
        raise ConfigError("no run folders to compare")
    names = [r["name"] for r in reports]
    if len(set(names)) != len(names):
        names = [r["rundir"] for r in reports]
    rows: list[tuple[str, list[str]]] = [
        ("protocol", [(r.get("protocol") or {}).get("id", "custom") for r in reports]),
        ("dataset", [f"{r['dataset']['name']}/{r['dataset']['split'] or 'all'}" for r in reports]),
        ("method", [r["method"]["name"] for r in reports]),
        ("model", [str(r["model"]["id"]) for r in reports]),
        ("seed", [str(r["seed"]) for r in reports]),
        ("images", [f"{r['num_images']}/{r['num_expected']}" + ("" if r["complete"] else " (incomplete)")
                    for r in reports]),
    ]
    params = [r["method"]["params"] for r in reports]
    keys = sorted({k for p in params for k in p})
    for k in keys:
        values = [json.dumps(p.get(k), sort_keys=True) for p in params]
        if len(set(values)) > 1:
            rows.append((f"param `{k}`", values))
    metric_rows: dict[str, list[str]] = {}
    primaries = [r["primary_metric"] for r in reports]
    ordered = list(dict.fromkeys(primaries))
    scalars = [scalar_metrics(r["metrics"]) for r in reports]
    for s in scalars:
        ordered += [k for k in s if k not in ordered]
    for k in ordered:
        metric_rows[k] = [format_value(s.get(k)) if k in s else "" for s in scalars]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    for k, values in metric_rows.items():
        label = f"**{k}**" if k in primaries else k
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"
