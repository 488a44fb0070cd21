"""Dataset readers, one module per on-disk layout, behind a registry.

Example:
    >>> from attnseg.eval.datasets import create_dataset, list_datasets
    >>> "cityscapes27" in list_datasets()
    True
    >>> ds = create_dataset("cityscapes27", "/data/cityscapes", split="val")  # doctest: +SKIP
    >>> sample = ds[0]  # doctest: +SKIP
    >>> sample.label.shape, sample.label.dtype  # doctest: +SKIP
    ((1024, 2048), dtype('int64'))

Importing this package registers every reader; it imports numpy only (PIL is imported when a
label is read).
"""

from __future__ import annotations

from attnseg.eval.datasets.ade20k import ADE20K150, ADE20K151
from attnseg.eval.datasets.base import DATASETS, Sample, SegmentationDataset, create_dataset, list_datasets
from attnseg.eval.datasets.cityscapes import Cityscapes19, Cityscapes27
from attnseg.eval.datasets.coco_object import CocoObject
from attnseg.eval.datasets.coco_stuff import CocoStuff27
from attnseg.eval.datasets.figaro import Figaro1k
from attnseg.eval.datasets.generic import GenericDataset
from attnseg.eval.datasets.pascal_context import PascalContext59, PascalContext60
from attnseg.eval.datasets.toyworld import ToyWorldDataset
from attnseg.eval.datasets.voc import VOC2012

__all__ = [
    "ADE20K150",
    "ADE20K151",
    "DATASETS",
    "VOC2012",
    "Cityscapes19",
    "Cityscapes27",
    "CocoObject",
    "CocoStuff27",
    "Figaro1k",
    "GenericDataset",
    "PascalContext59",
    "PascalContext60",
    "Sample",
    "SegmentationDataset",
    "ToyWorldDataset",
    "create_dataset",
    "list_datasets",
]
