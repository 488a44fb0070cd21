"""A plain folder of images and label maps (the layout the toy world is written in).

Layout::

    root/images/<stem>.jpg|.jpeg|.png      RGB images
    root/labels/<stem>.png                  single-channel label maps: pixel value = class id,
                                            255 = ignored (8- or 16-bit PNG)
    root/classes.txt                        optional: one class name per line, line i = id i
    root/splits/<split>.txt                 optional: ids (stems) of a split, one per line

Images and labels are paired by file stem; every image needs a label. Without a split (the
default) every image is read, sorted by stem. Class names come from ``classes.txt``, else from
``class_names=``, else ``num_classes=`` gives names ``"0".."n-1"``; with none of them the
dataset is class-agnostic (``class_names == ()``) and labels are not range-checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from attnseg.errors import ConfigError, DatasetError
from attnseg.eval.datasets.base import DATASETS, SegmentationDataset, _check_files, _find_root, _Item, _read_id_list

__all__ = ["GenericDataset"]

_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@DATASETS.register("generic", help="root/images/*.{jpg,png} + root/labels/*.png, optional classes.txt")
class GenericDataset(SegmentationDataset):
    """Reader of the generic folder layout (see the module docstring).

    Args:
        root: the folder holding ``images/`` and ``labels/``.
        split: None or ``"all"`` for every image, else the name of ``root/splits/<split>.txt``.
        class_names: class names when there is no ``classes.txt``.
        num_classes: number of classes when neither ``classes.txt`` nor ``class_names`` is given.
        ignore_index: label value that is not scored.
    """

    name = "generic"
    default_split = None

    def __init__(
        self,
        root: Path,
        split: str | None = None,
        *,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        ignore_index: int | None = 255,
    ) -> None:
        root = _find_root(Path(root), self.name, [""], "images", "a folder of images named <stem>.jpg/.png")
        _find_root(root, self.name, [""], "labels", "a folder of label PNGs named <stem>.png")
        images: dict[str, Path] = {}
        for path in sorted((root / "images").iterdir()):
            if path.suffix.lower() in _IMAGE_EXTS and path.is_file():
                if path.stem in images:
                    raise DatasetError(f"{self.name}: two images share the stem {path.stem!r} in {root / 'images'}")
                images[path.stem] = path
        if split in (None, "all"):
            ids = sorted(images)
        else:
            ids = _read_id_list(root / "splits" / f"{split}.txt", self.name, "ids of the split, one per line")
            missing = [i for i in ids if i not in images]
            if missing:
                raise DatasetError(
                    f"{self.name}: {len(missing)} id(s) of split {split!r} have no image, e.g. {missing[0]}"
                )
        if not ids:
            raise DatasetError(f"{self.name}: no images (*.jpg, *.jpeg, *.png) in {root / 'images'}")
        items = [_Item(i, images[i], root / "labels" / f"{i}.png") for i in ids]
        _check_files(items, self.name)
        classes_file = root / "classes.txt"
        if classes_file.is_file():
            names = [line.strip() for line in classes_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif class_names is not None:
            names = list(class_names)
        elif num_classes is not None:
            if num_classes < 1:
                raise ConfigError(f"{self.name}: num_classes must be positive, got {num_classes}")
            names = [str(k) for k in range(num_classes)]
        else:
            names = []
        super().__init__(root=root, split=split, items=items, class_names=names, ignore_index=ignore_index)

    def _convert_label(self, raw: NDArray[Any], item: _Item) -> NDArray[np.int64]:
        if raw.ndim != 2:
            raise DatasetError(f"{self.name}: label {item.label_path} has shape {raw.shape}; expected (H, W)")
        label = raw.astype(np.int64)
        if self.class_names:
            bad = (label >= self.num_classes) & (label != (self.ignore_index if self.ignore_index is not None else -1))
            if bad.any():
                raise DatasetError(
                    f"{self.name}: label {item.label_path} has value {int(label[bad][0])} but there are "
                    f"{self.num_classes} classes (ignore_index={self.ignore_index})"
                )
        return label
