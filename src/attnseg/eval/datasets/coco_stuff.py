"""COCO-Stuff-27: COCO-Stuff 164k ``stuffthingmaps`` reduced to 27 coarse classes.

Layout (the COCO 2017 images plus ``stuffthingmaps_trainval2017.zip`` unpacked)::

    root/images/val2017/000000000139.jpg                 (or root/val2017/)
    root/annotations/stuffthingmaps_trainval2017/val2017/000000000139.png
        (also accepted: root/stuffthingmaps_trainval2017/val2017/, root/annotations/val2017/,
         root/annotation_val2017/)

Label PNGs hold fine ids 0..181 (= COCO category id - 1) and 255 (unlabeled). They are mapped
to the 27 coarse classes (12 thing + 15 stuff supercategories) with the PiCIE/STEGO mapping
shipped in ``data/cocostuff27_fine_to_coarse.json``; 255 stays ignored.

``subset="curated"`` (default, val only) reads the 2,175 val2017 ids of
``Coco164kFull_Stuff_Coarse_7.txt`` (IIC/PiCIE lineage, used by DiffSeg), shipped as
``data/cocostuff27_curated_val2017.txt``; ``subset="all"`` reads every image of the split.
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
    data_file,
    load_json,
)

__all__ = ["CocoStuff27", "coco_image_dir", "coco_stuff_label_dir"]

_SPLITS = ("val", "train")


def coco_image_dir(root: Path, split: str, dataset: str) -> Path:
    """The folder of COCO 2017 images of ``split`` under ``root``."""
    return _first_dir(root, dataset, [f"images/{split}2017", f"{split}2017"], f"COCO {split}2017.zip unpacked")


def coco_stuff_label_dir(root: Path, split: str, dataset: str) -> Path:
    """The folder of raw COCO-Stuff ``stuffthingmaps`` PNGs of ``split`` under ``root``."""
    return _first_dir(
        root,
        dataset,
        [
            f"annotations/stuffthingmaps_trainval2017/{split}2017",
            f"stuffthingmaps_trainval2017/{split}2017",
            f"annotations/{split}2017",
            f"annotation_{split}2017",
        ],
        "stuffthingmaps_trainval2017.zip unpacked",
    )


@DATASETS.register("cocostuff27", help="COCO-Stuff 164k, 27 coarse classes (curated 2,175 val2017 by default)")
class CocoStuff27(SegmentationDataset):
    """COCO-Stuff-27 reader (see the module docstring for the layout).

    Args:
        root: folder holding ``images/`` and ``annotations/`` (or the accepted variants).
        split: ``"val"`` or ``"train"``.
        subset: ``"curated"`` (the 2,175-image val list) or ``"all"``.
    """

    name = "cocostuff27"

    def __init__(self, root: Path, split: str = "val", *, subset: str = "curated") -> None:
        if split not in _SPLITS:
            raise ConfigError(f"{self.name}: split must be one of {_SPLITS}, got {split!r}")
        if subset not in ("curated", "all"):
            raise ConfigError(f"{self.name}: subset must be 'curated' or 'all', got {subset!r}")
        if subset == "curated" and split != "val":
            raise ConfigError(f"{self.name}: the curated list exists for split 'val' only; use subset='all'")
        root = Path(root)
        image_dir = coco_image_dir(root, split, self.name)
        label_dir = coco_stuff_label_dir(root, split, self.name)
        if subset == "curated":
            ids = data_file("cocostuff27_curated_val2017.txt").read_text().split()
        else:
            ids = sorted(p.stem for p in image_dir.glob("*.jpg"))
        items = [_Item(i, image_dir / f"{i}.jpg", label_dir / f"{i}.png") for i in ids]
        _check_files(items, self.name)
        mapping = load_json("cocostuff27_fine_to_coarse.json")
        table = {int(k): v for k, v in mapping["fine_to_coarse"].items()}
        table[255] = 255
        self._table = _lut(table)
        self.subset = subset
        super().__init__(root=root, split=split, items=items, class_names=mapping["coarse_names"], ignore_index=255)

    def _convert_label(self, raw: NDArray[Any], item: _Item) -> NDArray[np.int64]:
        return _apply_lut(raw, self._table, self.name, item.label_path)
