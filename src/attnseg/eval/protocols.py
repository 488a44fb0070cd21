"""Evaluation protocols as data.

A :class:`Protocol` names everything that changes a number in a results table: dataset and
split, preprocessing, how predictions are matched to classes, how the background is decided,
where class names come from, and the paper the protocol reproduces. Every report should embed
``protocol.to_dict()``.

One protocol is registered per results table of METHODS.md. Protocols whose background is
``"oracle-threshold"`` (a threshold swept on the evaluated data itself, as GoCA's released
code does) must say so in their name (``*-oracle``); nothing selects that mode implicitly.

Example:
    >>> p = get_protocol("diffseg-cocostuff27")
    >>> p.matching, p.dataset
    ('per-image-hungarian', 'cocostuff27')
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attnseg.errors import ConfigError

__all__ = [
    "BACKGROUND_MODES",
    "CLASS_SOURCES",
    "MATCHING_MODES",
    "Protocol",
    "get_protocol",
    "list_protocols",
    "register_protocol",
]

MATCHING_MODES: tuple[str, ...] = (
    "per-image-hungarian",  # DiffSeg: one assignment per image, TP/FP/FN summed
    "dataset-hungarian",  # PiCIE: one assignment over the accumulated confusion
    "semantic",  # predicted ids are class ids (confusion matrix)
    "binary",  # one target concept vs the rest
    "top-n",  # Stillger et al. eq. 4, largest reference masks
    "best-match",  # Stillger et al. real images: best-IoU prediction per GT mask
)
CLASS_SOURCES: tuple[str, ...] = ("none", "oracle", "vocabulary", "captions")
_FIXED_BACKGROUND = ("none", "held-out-threshold", "oracle-threshold")
BACKGROUND_MODES: tuple[str, ...] = (*_FIXED_BACKGROUND, "threshold:<value>")
_THRESHOLD = re.compile(r"^threshold:(-?\d+(\.\d+)?)$")


@dataclass(frozen=True)
class Protocol:
    """One named, versioned evaluation protocol.

    Attributes:
        name: registry key, e.g. ``"goca-voc-oracle"``.
        version: bumped whenever a field changes in a way that changes numbers.
        dataset: a name registered in :mod:`attnseg.eval.datasets`.
        split: dataset split evaluated.
        preprocessing: image and label preparation, e.g. ``"center-crop+resize 512"``.
        resolution: side of the model input in pixels, or None when it depends on the model.
        matching: one of :data:`MATCHING_MODES`.
        background: ``"none"``, ``"threshold:<value>"``, ``"held-out-threshold"`` or
            ``"oracle-threshold"`` (only in protocols named ``*-oracle``).
        class_source: where the class names of the prompt come from: ``"none"`` (class-agnostic),
            ``"oracle"`` (ground-truth classes of each image), ``"vocabulary"`` (all dataset
            classes), ``"captions"`` (a captioner or LLM).
        num_classes: classes scored (background included when it is a class).
        metrics: metric names reported, primary first.
        notes: what a reader must know to compare numbers (protocol quirks, unconfirmed points).
        source: paper (and table) whose numbers this protocol reproduces.
        dataset_options: keyword arguments for ``create_dataset`` (as sorted key/value pairs).
        held_out_split: split used to choose a threshold when ``background`` is
            ``"held-out-threshold"``.
    """

    name: str
    version: int
    dataset: str
    split: str
    preprocessing: str
    resolution: int | None
    matching: str
    background: str
    class_source: str
    num_classes: int
    metrics: tuple[str, ...]
    notes: str
    source: str
    dataset_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    held_out_split: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError("Protocol name must be a non-empty string")
        if not isinstance(self.version, int) or self.version < 1:
            raise ConfigError(f"Protocol {self.name}: version must be a positive integer, got {self.version!r}")
        if self.matching not in MATCHING_MODES:
            raise ConfigError(f"Protocol {self.name}: matching {self.matching!r} not in {MATCHING_MODES}")
        if self.class_source not in CLASS_SOURCES:
            raise ConfigError(f"Protocol {self.name}: class_source {self.class_source!r} not in {CLASS_SOURCES}")
        if self.background not in _FIXED_BACKGROUND and not _THRESHOLD.match(self.background):
            raise ConfigError(f"Protocol {self.name}: background {self.background!r} not one of {BACKGROUND_MODES}")
        if self.background == "oracle-threshold" and not self.name.endswith("-oracle"):
            raise ConfigError(
                f"Protocol {self.name}: background 'oracle-threshold' tunes on the evaluated data; "
                "name the protocol '*-oracle' so reports cannot hide it"
            )
        if self.background == "held-out-threshold" and not self.held_out_split:
            raise ConfigError(f"Protocol {self.name}: background 'held-out-threshold' needs held_out_split")
        if self.num_classes < 1:
            raise ConfigError(f"Protocol {self.name}: num_classes must be positive")
        if not self.metrics:
            raise ConfigError(f"Protocol {self.name}: metrics must name at least one metric")
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "dataset_options", tuple(sorted(dict(self.dataset_options).items())))

    @property
    def id(self) -> str:
        """``"<name>@v<version>"``, the string to print next to every number."""
        return f"{self.name}@v{self.version}"

    @property
    def dataset_kwargs(self) -> dict[str, Any]:
        """``dataset_options`` as a dict, for ``create_dataset(p.dataset, root, split=p.split, **kw)``."""
        return dict(self.dataset_options)

    @property
    def threshold(self) -> float | None:
        """The fixed background threshold of ``"threshold:<value>"``, else None."""
        m = _THRESHOLD.match(self.background)
        return float(m.group(1)) if m else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (embed it in every report)."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "dataset": self.dataset,
            "split": self.split,
            "dataset_options": self.dataset_kwargs,
            "preprocessing": self.preprocessing,
            "resolution": self.resolution,
            "matching": self.matching,
            "background": self.background,
            "held_out_split": self.held_out_split,
            "class_source": self.class_source,
            "num_classes": self.num_classes,
            "metrics": list(self.metrics),
            "notes": self.notes,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Protocol:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=data["name"],
            version=int(data["version"]),
            dataset=data["dataset"],
            split=data["split"],
            preprocessing=data["preprocessing"],
            resolution=data["resolution"],
            matching=data["matching"],
            background=data["background"],
            class_source=data["class_source"],
            num_classes=int(data["num_classes"]),
            metrics=tuple(data["metrics"]),
            notes=data["notes"],
            source=data["source"],
            dataset_options=tuple(dict(data.get("dataset_options") or {}).items()),
            held_out_split=data.get("held_out_split"),
        )


_PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol) -> Protocol:
    """Add a protocol to the registry; a name can be registered once."""
    if protocol.name in _PROTOCOLS:
        raise ConfigError(f"protocol {protocol.name!r} is registered twice")
    _PROTOCOLS[protocol.name] = protocol
    return protocol


def get_protocol(name: str) -> Protocol:
    """The registered protocol called ``name`` (``"name@vN"`` also accepted and checked)."""
    base, _, version = name.partition("@v")
    try:
        protocol = _PROTOCOLS[base]
    except KeyError:
        known = ", ".join(sorted(_PROTOCOLS))
        raise ConfigError(f"unknown protocol {name!r}; known: {known}") from None
    if version and version != str(protocol.version):
        raise ConfigError(f"protocol {base!r} is at version {protocol.version}, not {version}")
    return protocol


def list_protocols(pattern: str = "*") -> list[str]:
    """Sorted names of registered protocols matching a glob pattern."""
    return sorted(n for n in _PROTOCOLS if fnmatch.fnmatch(n, pattern))


# --------------------------------------------------------------------------------------------
# registered protocols (METHODS.md "Evaluation" of sections 2-5)

_DIFFSEG_SOURCE = "DiffSeg (Tian et al., CVPR 2024), Table 1; code google/diffseg benchmarks.ipynb"
_DIFFSEG_PRE = "center-crop to square, resize 512 (bilinear image, nearest label)"
_HUNGARIAN_METRICS = ("miou", "pixel_accuracy")

register_protocol(
    Protocol(
        name="diffseg-cocostuff27",
        version=1,
        dataset="cocostuff27",
        split="val",
        dataset_options=(("subset", "curated"),),
        preprocessing=_DIFFSEG_PRE,
        resolution=512,
        matching="per-image-hungarian",
        background="none",
        class_source="none",
        num_classes=27,
        metrics=_HUNGARIAN_METRICS,
        notes=(
            "2,175 curated val2017 images (Coco164kFull_Stuff_Coarse_7.txt); 182 fine -> 27 coarse, 255 ignored. "
            "Per-image Hungarian: confusion 27 x max(27, K), TP/FP/FN summed, unmatched segments add no FP; "
            "mIoU = NaN-mean. Reported (unconfirmed): ACC 72.5 / mIoU 43.6."
        ),
        source=_DIFFSEG_SOURCE,
    )
)
register_protocol(
    Protocol(
        name="diffseg-cityscapes27",
        version=1,
        dataset="cityscapes27",
        split="val",
        preprocessing=_DIFFSEG_PRE,
        resolution=512,
        matching="per-image-hungarian",
        background="none",
        class_source="none",
        num_classes=27,
        metrics=_HUNGARIAN_METRICS,
        notes=(
            "All 500 val images, gtFine labelIds 7..33 -> 27 classes, 0-6 ignored. Per-image Hungarian as for "
            "COCO-Stuff-27. Reported (unconfirmed): ACC 76.0 / mIoU 21.2."
        ),
        source=_DIFFSEG_SOURCE,
    )
)

_GOCA_SOURCE = "GoCA (Meng et al., CVPR 2026, arXiv 2603.06178), Table 1; code Darkbblue/goca src-main"
_GOCA_PRE = "resize (squash, no crop) to the model's input size: 512 SD1.5, 1024 SDXL / PixArt-Sigma / Flux"
_GOCA_METRICS = ("miou_absent_as_zero",)
_GOCA_NOTE = (
    "I and U summed over the dataset; mIoU = mean over all classes incl. background with IoU = I/(U+1e-8) "
    "(unseen classes score 0). Predicted map: bilinear upsampling to the label size, background channel = "
    "offset + support map, classes absent from the prompt get 0, argmax. Class lists are filtered to (and "
    "completed with) each image's ground-truth classes."
)
_GOCA_ORACLE_NOTE = " Background offset swept over -0.4..0.4 (step 0.1) ON THE EVALUATED DATA; best value reported."
_GOCA_HELD_OUT_NOTE = " Background offset chosen over -0.4..0.4 (step 0.1) on held_out_split, then fixed ([proposal])."

_GOCA_SETS: tuple[tuple[str, str, str, str | None, int, tuple[tuple[str, Any], ...], str], ...] = (
    # key, dataset, split, held-out split, classes, dataset options, dataset note
    (
        "voc",
        "voc2012",
        "train",
        "val",
        21,
        (("boundary", "background"),),
        "VOC 2012 train (1,464); boundary 255 -> background. Paper: SD1.5 60.7, Flux 70.7.",
    ),
    (
        "context",
        "pascal-context-60",
        "train",
        "val",
        60,
        (("reverse", True), ("limit", 3000)),
        "Pascal Context train, first 3,000 of the reversed list; 59 classes + background. Paper: SD1.5 40.4.",
    ),
    (
        "coco-object",
        "coco-object",
        "val",
        "train",
        81,
        (),
        "COCO-Object val2017, 80 things + background (GoCA says 'panoptic'; the exact label source is "
        "unconfirmed, the common converted layout is used). Paper: SD1.5 39.2.",
    ),
    (
        "cityscapes",
        "cityscapes19",
        "val",
        "train",
        19,
        (),
        "Cityscapes val, 19 trainId classes; GoCA adds a background channel whose scoring on void pixels is "
        "unconfirmed (void pixels ignored here). Paper: SD1.5 16.1.",
    ),
    (
        "ade",
        "ade20k-151",
        "val",
        "train",
        151,
        (),
        "ADE20K val, 150 classes + label 0 ('other') scored as background. Paper: SD1.5 22.0.",
    ),
)

for _key, _ds, _split, _held, _n, _opts, _note in _GOCA_SETS:
    for _oracle in (True, False):
        register_protocol(
            Protocol(
                name=f"goca-{_key}-oracle" if _oracle else f"goca-{_key}",
                version=1,
                dataset=_ds,
                split=_split,
                dataset_options=_opts,
                preprocessing=_GOCA_PRE,
                resolution=None,
                matching="semantic",
                background="oracle-threshold" if _oracle else "held-out-threshold",
                held_out_split=None if _oracle else _held,
                class_source="oracle",
                num_classes=_n,
                metrics=_GOCA_METRICS,
                notes=_note + " " + _GOCA_NOTE + (_GOCA_ORACLE_NOTE if _oracle else _GOCA_HELD_OUT_NOTE),
                source=_GOCA_SOURCE,
            )
        )

_HAIR_SOURCE = "Cross-attention-guided self-attention selection for hair segmentation (METHODS.md §4), Table 1"
_HAIR_NOTE = (
    "Figaro-1k, hair = GT pixels > 0 (white). Hair is the positive class: Acc = (TP+TN)/all, P = TP/(TP+FP), "
    "F1 = 2TP/(2TP+FP+FN); mIoU = mean(IoU_hair, IoU_background) ([proposal], undefined in the paper). "
    "Per-image means are primary, pooled values also reported. Mask: Otsu at 64x64, nearest resize."
)
for _split, _target in (("test", " Targets (test): mIoU 0.8768 / Acc 0.9418 / P 0.9269 / F1 0.9323."), ("train", "")):
    register_protocol(
        Protocol(
            name="hair-figaro1k" if _split == "test" else "hair-figaro1k-train",
            version=1,
            dataset="figaro1k",
            split=_split,
            preprocessing="resize 512 (squash), mask resized back to the image size",
            resolution=512,
            matching="binary",
            background="none",
            class_source="none",
            num_classes=2,
            metrics=("miou", "accuracy", "precision", "f1", "iou", "recall"),
            notes=_HAIR_NOTE + _target,
            source=_HAIR_SOURCE,
        )
    )

_PCC_SOURCE = "Stillger et al., principal-component clustering of self-attention, Table 3 (real images)"
_PCC_NOTE = (
    "img2img strength 0.05, empty prompt, capture at the last UNet call. For each GT mask (semantic: one per "
    "class present, ignore pixels left out) the best-IoU mask among all merged cluster masks; class-wise IoU "
    "per image, averaged over images. Instance-level numbers need instance masks (not provided by this reader)."
)
register_protocol(
    Protocol(
        name="pcc-voc-bestmatch",
        version=1,
        dataset="voc2012",
        split="val",
        dataset_options=(("boundary", "ignore"),),
        preprocessing="resize 512 (unconfirmed), masks nearest-upsampled to the label size",
        resolution=512,
        matching="best-match",
        background="none",
        class_source="none",
        num_classes=21,
        metrics=("best_match_iou",),
        notes=_PCC_NOTE + " Paper: VOC 0.66 (semantic) / 0.62 (instance).",
        source=_PCC_SOURCE,
    )
)
register_protocol(
    Protocol(
        name="pcc-cityscapes-bestmatch",
        version=1,
        dataset="cityscapes19",
        split="val",
        preprocessing="resize 512 (unconfirmed), masks nearest-upsampled to the label size",
        resolution=512,
        matching="best-match",
        background="none",
        class_source="none",
        num_classes=19,
        metrics=("best_match_iou",),
        notes=_PCC_NOTE + " Cityscapes class set of the paper unconfirmed (19 trainIds used). Paper: 0.27 / 0.21.",
        source=_PCC_SOURCE,
    )
)
