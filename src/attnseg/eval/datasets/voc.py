"""PASCAL VOC 2012 semantic segmentation (21 classes including background).

Layout (``VOCtrainval_11-May-2012.tar`` unpacked; ``root`` may be ``VOC2012``, ``VOCdevkit``
or their parent)::

    root/JPEGImages/2007_000033.jpg
    root/SegmentationClass/2007_000033.png        (palette PNG: 0..20, 255 = boundary/void)
    root/ImageSets/Segmentation/{train,val}.txt   (1,464 / 1,449 ids)

``annotations="SegmentationClassAug"`` reads the SBD-augmented grayscale labels from
``root/SegmentationClassAug`` instead (split lists such as ``trainaug.txt`` must then be in
``ImageSets/Segmentation``).

``boundary="ignore"`` (default) keeps 255 as the ignore index; ``boundary="background"`` maps
it to class 0, as GoCA's VOC train protocol does.
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
    _find_root,
    _Item,
    _lut,
    _read_id_list,
    load_json,
)

__all__ = ["VOC2012"]


@DATASETS.register("voc2012", help="PASCAL VOC 2012 segmentation, 20 classes + background")
class VOC2012(SegmentationDataset):
    """PASCAL VOC 2012 reader (see the module docstring for the layout).

    Args:
        root: the ``VOC2012`` folder, or ``VOCdevkit``, or the folder containing ``VOCdevkit``.
        split: name of a list in ``ImageSets/Segmentation`` (``"train"``, ``"val"``, ...).
        boundary: ``"ignore"`` (255 not scored) or ``"background"`` (255 -> 0).
        annotations: ``"SegmentationClass"`` or ``"SegmentationClassAug"``.
    """

    name = "voc2012"

    def __init__(
        self,
        root: Path,
        split: str = "val",
        *,
        boundary: str = "ignore",
        annotations: str = "SegmentationClass",
    ) -> None:
        if boundary not in ("ignore", "background"):
            raise ConfigError(f"{self.name}: boundary must be 'ignore' or 'background', got {boundary!r}")
        if annotations not in ("SegmentationClass", "SegmentationClassAug"):
            raise ConfigError(
                f"{self.name}: annotations must be 'SegmentationClass' or 'SegmentationClassAug', got {annotations!r}"
            )
        root = _find_root(
            Path(root),
            "VOC2012",
            ["", "VOC2012", "VOCdevkit/VOC2012"],
            "JPEGImages",
            "VOCtrainval_11-May-2012.tar unpacked",
        )
        _find_root(root, "VOC2012", [""], annotations, f"{annotations} label PNGs")
        ids = _read_id_list(
            root / "ImageSets" / "Segmentation" / f"{split}.txt", "VOC2012", "the split's id list, one id per line"
        )
        items = [_Item(i, root / "JPEGImages" / f"{i}.jpg", root / annotations / f"{i}.png") for i in ids]
        _check_files(items, "VOC2012")
        table = {k: k for k in range(21)}
        table[255] = 0 if boundary == "background" else 255
        self._table = _lut(table)
        self.boundary = boundary
        super().__init__(
            root=root, split=split, items=items, class_names=load_json("class_names.json")["voc21"]["names"]
        )

    def _convert_label(self, raw: NDArray[Any], item: _Item) -> NDArray[np.int64]:
        return _apply_lut(raw, self._table, self.name, item.label_path)
