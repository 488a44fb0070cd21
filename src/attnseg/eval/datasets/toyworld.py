"""The toy world's datasets: the generic layout written by ``attnseg toyworld generate``."""

from __future__ import annotations

from pathlib import Path

from attnseg.errors import DatasetError
from attnseg.eval.datasets.base import DATASETS
from attnseg.eval.datasets.generic import GenericDataset

__all__ = ["ToyWorldDataset"]


@DATASETS.register("toyworld", help="scenes written by `attnseg toyworld generate` (generic layout, 4 classes)")
class ToyWorldDataset(GenericDataset):
    """A toy-world dataset folder (``images/``, ``labels/``, ``classes.txt``, ``captions.json``).

    Args:
        root: the folder ``attnseg toyworld generate --out ROOT`` wrote.
        split: None (every scene in the folder) or a split list under ``root/splits``.
    """

    name = "toyworld"

    def __init__(self, root: Path, split: str | None = None, **kwargs: object) -> None:
        root = Path(root)
        hint = f"write one with `attnseg toyworld generate --out {root} --split test --n 200`"
        if not root.exists():
            raise DatasetError(f"toyworld: dataset root {root} does not exist; {hint}")
        if not (root / "images").is_dir():
            raise DatasetError(f"toyworld: expected a folder of scenes at {root} (with images/ and labels/); {hint}")
        super().__init__(root, None if split in (None, "all", "test", "val", "train") else split, **kwargs)
