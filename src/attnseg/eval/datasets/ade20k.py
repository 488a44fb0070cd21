"""ADE20K SceneParsing (ADEChallengeData2016), 150 classes.

Layout (``ADEChallengeData2016.zip`` unpacked; ``root`` may be the folder itself or its parent)::

    root/images/validation/ADE_val_00000001.jpg
    root/annotations/validation/ADE_val_00000001.png   (0 = other, 1..150 classes)

- ``ade20k-150``: "reduce zero label": 0 -> 255 ignored, k -> k-1 (the standard benchmark).
- ``ade20k-151``: 0 kept as class 0 ("background"), as GoCA scores it (150 + background).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from attnseg.errors import ConfigError
from attnseg.eval.datasets.base import (
    DATASETS,
    SegmentationDataset,
    _apply_lut,
    _check_files,
    _find_root,
    _Item,
    _zero_label_table,
    load_json,
)

__all__ = ["ADE20K150", "ADE20K151", "ADE20KBase"]

_SPLITS = {"val": "validation", "validation": "validation", "train": "training", "training": "training"}


class ADE20KBase(SegmentationDataset):
    """Shared ADE20K layout; subclasses decide what label 0 means.

    Args:
        root: ``ADEChallengeData2016`` or its parent.
        split: ``"val"``/``"validation"`` (2,000 images) or ``"train"``/``"training"``.
    """

    reduce_zero_label: ClassVar[bool] = True

    def __init__(self, root: Path, split: str = "val") -> None:
        if split not in _SPLITS:
            raise ConfigError(f"{self.name}: split must be one of {sorted(_SPLITS)}, got {split!r}")
        folder = _SPLITS[split]
        root = _find_root(
            Path(root),
            "ADE20K",
            ["", "ADEChallengeData2016"],
            f"images/{folder}",
            "ADEChallengeData2016.zip unpacked",
        )
        _find_root(root, "ADE20K", [""], f"annotations/{folder}", "ADEChallengeData2016.zip unpacked")
        items = [
            _Item(p.stem, p, root / "annotations" / folder / f"{p.stem}.png")
            for p in sorted((root / "images" / folder).glob("*.jpg"))
        ]
        _check_files(items, "ADE20K")
        names = load_json("class_names.json")["ade20k150"]["names"]
        self._table, names = _zero_label_table(151, names, keep_zero=not self.reduce_zero_label)
        super().__init__(root=root, split=folder, items=items, class_names=names, ignore_index=255)

    def _convert_label(self, raw: NDArray[Any], item: _Item) -> NDArray[np.int64]:
        return _apply_lut(raw, self._table, self.name, item.label_path)


@DATASETS.register("ade20k-150", help="ADE20K, 150 classes, label 0 ignored (reduce_zero_label)")
class ADE20K150(ADE20KBase):
    """ADE20K with 150 classes; label 0 ("other") ignored."""

    name = "ade20k-150"
    reduce_zero_label = True


@DATASETS.register("ade20k-151", help="ADE20K, 150 classes + label 0 as background (GoCA)")
class ADE20K151(ADE20KBase):
    """ADE20K with label 0 kept as a background class (151 classes)."""

    name = "ade20k-151"
    reduce_zero_label = False
