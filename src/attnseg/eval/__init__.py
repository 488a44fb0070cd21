"""Evaluation: dataset readers, metrics and protocols.

Submodules:

- :mod:`attnseg.eval.metrics`: confusion matrices, Hungarian matching (per image and per
  dataset), binary scores, top-n and best-match IoU.
- :mod:`attnseg.eval.datasets`: one reader per on-disk layout behind ``create_dataset``.
- :mod:`attnseg.eval.protocols`: named, versioned evaluation protocols.

Importing this package is cheap; the names below are loaded from their submodule on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BinaryAccumulator",
    "BinaryScores",
    "ConfusionMatrix",
    "DatasetHungarian",
    "PerImageHungarian",
    "Protocol",
    "best_match_iou",
    "binary_scores",
    "create_dataset",
    "get_protocol",
    "hungarian_match",
    "list_datasets",
    "list_protocols",
    "top_n_iou",
]

_LAZY = {
    "BinaryAccumulator": "metrics",
    "BinaryScores": "metrics",
    "ConfusionMatrix": "metrics",
    "DatasetHungarian": "metrics",
    "PerImageHungarian": "metrics",
    "best_match_iou": "metrics",
    "binary_scores": "metrics",
    "hungarian_match": "metrics",
    "top_n_iou": "metrics",
    "create_dataset": "datasets",
    "list_datasets": "datasets",
    "Protocol": "protocols",
    "get_protocol": "protocols",
    "list_protocols": "protocols",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
