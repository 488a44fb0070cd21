"""Cityscapes (fine annotations), as 27 classes (DiffSeg/PiCIE) or the 19 official trainIds.

Layout (``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` unpacked)::

    root/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png
    root/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png

Only ``*_gtFine_labelIds.png`` is read; both class sets are mapped from it:

- ``cityscapes27``: labelIds 7..33 -> 0..26 (road ... bicycle, id order); 0-6 and anything
  else (license plate) -> 255 ignored.
- ``cityscapes19``: the official trainIds (road=0 ... bicycle=18); all other ids -> 255.

Sample ids are the file stems without suffix (``frankfurt_000000_000294``), sorted.
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
    _lut,
    load_json,
)

__all__ = ["Cityscapes19", "Cityscapes27", "CityscapesBase"]

_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


class CityscapesBase(SegmentationDataset):
    """Shared Cityscapes layout; subclasses choose the class set.

    Args:
        root: folder holding ``leftImg8bit/`` and ``gtFine/`` (or its parent with a
            ``cityscapes/`` folder).
        split: ``"val"`` (500 images), ``"train"`` or ``"test"`` (test labels are void).
    """

    label_set: ClassVar[str] = ""

    def __init__(self, root: Path, split: str = "val") -> None:
        if split not in ("train", "val", "test"):
            raise ConfigError(f"{self.name}: split must be 'train', 'val' or 'test', got {split!r}")
        root = _find_root(
            Path(root),
            "Cityscapes",
            ["", "cityscapes"],
            f"leftImg8bit/{split}",
            "leftImg8bit_trainvaltest.zip unpacked",
        )
        _find_root(root, "Cityscapes", [""], f"gtFine/{split}", "gtFine_trainvaltest.zip unpacked")
        items = []
        for path in sorted((root / "leftImg8bit" / split).glob(f"*/*{_IMAGE_SUFFIX}")):
            stem = path.name[: -len(_IMAGE_SUFFIX)]
            city = path.parent.name
            label = root / "gtFine" / split / city / f"{stem}{_LABEL_SUFFIX}"
            items.append(_Item(stem, path, label, {"city": city}))
        _check_files(items, "Cityscapes")
        info = load_json("cityscapes_labels.json")
        if self.label_set == "27":
            names, mapping = info["names27"], info["label_id_to_27"]
        else:
            names, mapping = info["names19"], info["label_id_to_train_id"]
        # every other labelId (void 0-6, classes outside the set, license plate) is ignored
        self._table = _lut({int(k): v for k, v in mapping.items()}, default=255)
        super().__init__(root=root, split=split, items=items, class_names=names, ignore_index=255)

    def _convert_label(self, raw: NDArray[Any], item: _Item) -> NDArray[np.int64]:
        return _apply_lut(raw, self._table, self.name, item.label_path)


@DATASETS.register("cityscapes27", help="Cityscapes gtFine, labelIds 7..33 -> 27 classes (DiffSeg/PiCIE)")
class Cityscapes27(CityscapesBase):
    """Cityscapes with 27 classes (labelIds 7..33), as evaluated by PiCIE, STEGO and DiffSeg."""

    name = "cityscapes27"
    label_set = "27"


@DATASETS.register("cityscapes19", help="Cityscapes gtFine, the 19 official trainId classes")
class Cityscapes19(CityscapesBase):
    """Cityscapes with the 19 official trainId classes."""

    name = "cityscapes19"
    label_set = "19"
