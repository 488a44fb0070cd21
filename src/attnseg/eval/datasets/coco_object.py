"""COCO-Object: COCO val2017 with 80 thing classes + background, as in open-vocabulary work.

Layout of the converted labels (GroupViT/TCL-style ``tools/convert_coco_object.py`` run on
COCO-Stuff 164k; mmsegmentation's ``coco_stuff164k`` folder)::

    root/images/val2017/000000000139.jpg                     (or root/val2017/)
    root/annotations/val2017/000000000139_instanceTrainIds.png

Label values: 0 = background (all stuff), 1..80 = COCO things in category-id order, 255 =
ignored. Note: the public converter adds 1 to every id *including 255*, which a uint8 array
silently wraps to 0 on old numpy, so converted files may count "unlabeled" pixels as
background (version-dependent, unconfirmed).

``labels="stuffthingmaps"`` derives the same labels on the fly from the raw COCO-Stuff PNGs
(see :mod:`attnseg.eval.datasets.coco_stuff` for their layout), keeping 255 ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from attnseg.errors import ConfigError
from attnseg.eval.datasets.base import (
    DATASETS,
    SegmentationDataset,
    _apply_lut,
    _check_files,
    _first_dir,
    _Item,
    _lut,
    load_json,
)
from attnseg.eval.datasets.coco_stuff import coco_image_dir, coco_stuff_label_dir

__all__ = ["CocoObject"]

_SUFFIX = "_instanceTrainIds.png"


@DATASETS.register("coco-object", help="COCO-Object: 80 COCO things + background (val2017)")
class CocoObject(SegmentationDataset):
    """COCO-Object reader (see the module docstring for the layout).

    Args:
        root: folder holding ``images/`` and ``annotations/``.
        split: ``"val"`` or ``"train"``.
        labels: ``"converted"`` (``*_instanceTrainIds.png``, default) or ``"stuffthingmaps"``.
    """

    name = "coco-object"

    def __init__(self, root: Path, split: str = "val", *, labels: str = "converted") -> None:
        if split not in ("val", "train"):
            raise ConfigError(f"{self.name}: split must be 'val' or 'train', got {split!r}")
        if labels not in ("converted", "stuffthingmaps"):
            raise ConfigError(f"{self.name}: labels must be 'converted' or 'stuffthingmaps', got {labels!r}")
        root = Path(root)
        image_dir = coco_image_dir(root, split, self.name)
        ids = sorted(p.stem for p in image_dir.glob("*.jpg"))
        meta = load_json("class_names.json")["coco_object80"]
        if labels == "converted":
            label_dir = _first_dir(
                root,
                self.name,
                [f"annotations/{split}2017"],
                f"COCO-Stuff labels converted with convert_coco_object.py into *{_SUFFIX}",
            )
            items = [_Item(i, image_dir / f"{i}.jpg", label_dir / f"{i}{_SUFFIX}") for i in ids]
            self._table = _lut({k: k for k in range(81)} | {255: 255})
        else:
            label_dir = coco_stuff_label_dir(root, split, self.name)
            items = [_Item(i, image_dir / f"{i}.jpg", label_dir / f"{i}.png") for i in ids]
            table = {fine: 0 for fine in range(91, 182)}  # stuff -> background
            table.update({fine: k + 1 for k, fine in enumerate(meta["stuffthingmaps_thing_ids"])})
            table[255] = 255
            self._table = _lut(table)
        _check_files(items, self.name)
        self.labels = labels
        super().__init__(
            root=root, split=split, items=items, class_names=["background", *meta["names"]], ignore_index=255
        )

    def _convert_label(self, raw: NDArray[Any], item: _Item) -> NDArray[np.int64]:
        return _apply_lut(raw, self._table, self.name, item.label_path)
