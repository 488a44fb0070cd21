"""PASCAL Context, 59 frequent classes (+ background), in mmsegmentation's converted layout.

Layout (VOC2010 images plus labels written by mmsegmentation's
``tools/dataset_converters/pascal_context.py``; ``root`` may be ``VOC2010``, ``VOCdevkit`` or
their parent)::

    root/JPEGImages/2008_000002.jpg
    root/SegmentationClassContext/2008_000002.png         (0 = background, 1..59 classes)
    root/ImageSets/SegmentationContext/{train,val}.txt    (written by the converter)

Label value k (1..59) is the k-th class of the alphabetical 59-class list (the converter sorts
the Detail API ids, which are alphabetical), shipped in ``data/class_names.json``.

- ``pascal-context-60``: background is class 0 (60 classes), as GoCA scores it.
- ``pascal-context-59``: background is ignored (0 -> 255, k -> k-1), mmseg's
  ``PascalContextDataset59`` with ``reduce_zero_label=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from attnseg.eval.datasets.base import (
    DATASETS,
    SegmentationDataset,
    _apply_lut,
    _check_files,
    _find_root,
    _Item,
    _read_id_list,
    _zero_label_table,
    load_json,
)

__all__ = ["PascalContext59", "PascalContext60", "PascalContextBase"]


class PascalContextBase(SegmentationDataset):
    """Shared PASCAL Context layout; subclasses decide whether background is a class.

    Args:
        root: the ``VOC2010`` folder, ``VOCdevkit``, or the folder containing ``VOCdevkit``.
        split: ``"train"`` or ``"val"`` (any list in ``ImageSets/SegmentationContext``).
    """

    background_is_class: ClassVar[bool] = True

    def __init__(self, root: Path, split: str = "val") -> None:
        root = _find_root(
            Path(root),
            "PascalContext",
            ["", "VOC2010", "VOCdevkit/VOC2010"],
            "SegmentationClassContext",
            "labels written by mmsegmentation tools/dataset_converters/pascal_context.py",
        )
        ids = _read_id_list(
            root / "ImageSets" / "SegmentationContext" / f"{split}.txt",
            "PascalContext",
            "written by the mmsegmentation converter",
        )
        items = [
            _Item(i, root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClassContext" / f"{i}.png") for i in ids
        ]
        _check_files(items, "PascalContext")
        names = load_json("class_names.json")["pascal_context59"]["names"]
        self._table, names = _zero_label_table(60, names, keep_zero=self.background_is_class)
        super().__init__(root=root, split=split, items=items, class_names=names, ignore_index=255)

    def _convert_label(self, raw: NDArray[Any], item: _Item) -> NDArray[np.int64]:
        return _apply_lut(raw, self._table, self.name, item.label_path)


@DATASETS.register("pascal-context-60", help="PASCAL Context, background + 59 classes (GoCA)")
class PascalContext60(PascalContextBase):
    """PASCAL Context with background as class 0 (60 classes)."""

    name = "pascal-context-60"
    background_is_class = True


@DATASETS.register("pascal-context-59", help="PASCAL Context, 59 classes, background ignored")
class PascalContext59(PascalContextBase):
    """PASCAL Context with the 59 classes only (background ignored)."""

    name = "pascal-context-59"
    background_is_class = False
