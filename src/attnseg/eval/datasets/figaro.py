"""Figaro-1k hair segmentation (binary: background / hair).

Layout (``Figaro1k.zip`` unpacked; ``root`` may be ``Figaro1k`` or its parent)::

    root/Original/Training/Frame00001-org.jpg    (840 images, unconfirmed)
    root/Original/Testing/Frame00010-org.jpg     (210 images, unconfirmed)
    root/GT/Training/Frame00001-gt.pbm
    root/GT/Testing/Frame00010-gt.pbm

Ground-truth masks are 1-bit PBMs with hair drawn white; PIL reads white as non-zero, so
hair = pixels > 0 (the polarity public loaders use). Label: 0 = background, 1 = hair; no
pixel is ignored. The archive has duplicate ``*(1).pbm`` files in ``GT/Training`` that public
download scripts delete; they are never read here because masks are looked up by image name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from attnseg.errors import ConfigError
from attnseg.eval.datasets.base import DATASETS, SegmentationDataset, _check_files, _find_root, _Item

__all__ = ["Figaro1k"]

_SPLITS = {"train": "Training", "training": "Training", "test": "Testing", "testing": "Testing"}
_IMAGE_SUFFIX = "-org.jpg"
_MASK_SUFFIX = "-gt.pbm"


@DATASETS.register("figaro1k", help="Figaro-1k hair masks (binary)")
class Figaro1k(SegmentationDataset):
    """Figaro-1k reader (see the module docstring for the layout).

    Args:
        root: ``Figaro1k`` or its parent.
        split: ``"test"``/``"testing"`` or ``"train"``/``"training"``.
    """

    name = "figaro1k"
    default_split = "test"

    def __init__(self, root: Path, split: str = "test") -> None:
        if split.lower() not in _SPLITS:
            raise ConfigError(f"{self.name}: split must be 'train' or 'test', got {split!r}")
        folder = _SPLITS[split.lower()]
        root = _find_root(Path(root), "Figaro1k", ["", "Figaro1k"], f"Original/{folder}", "Figaro1k.zip unpacked")
        _find_root(root, "Figaro1k", [""], f"GT/{folder}", "Figaro1k.zip unpacked")
        items = []
        for path in sorted((root / "Original" / folder).glob(f"*{_IMAGE_SUFFIX}")):
            stem = path.name[: -len(_IMAGE_SUFFIX)]
            items.append(_Item(stem, path, root / "GT" / folder / f"{stem}{_MASK_SUFFIX}"))
        _check_files(items, "Figaro1k")
        super().__init__(root=root, split=folder, items=items, class_names=["background", "hair"], ignore_index=None)

    def _convert_label(self, raw: NDArray[Any], item: _Item) -> NDArray[np.int64]:
        if raw.ndim == 3:  # a re-saved RGB/RGBA mask: any non-zero channel is hair
            raw = raw.max(axis=-1)
        return (raw > 0).astype(np.int64)
