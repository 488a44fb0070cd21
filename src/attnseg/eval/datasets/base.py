"""Common base of the dataset readers, the dataset registry and label-file helpers.

A reader lists ``(id, image path, label path)`` at construction (checking that every file
exists, so a wrong root fails at once with a message naming the expected folder) and reads a
label only in ``__getitem__``. Images are never decoded here: :class:`Sample` carries the image
path, and :meth:`Sample.open_image` is a convenience.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from attnseg.errors import ConfigError, DatasetError
from attnseg.registry import Registry

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DATASETS",
    "Sample",
    "SegmentationDataset",
    "create_dataset",
    "list_datasets",
]

#: Registry of dataset readers (name -> SegmentationDataset subclass).
DATASETS: Registry[type[SegmentationDataset]] = Registry("dataset")


@dataclass(frozen=True)
class Sample:
    """One evaluation sample.

    Attributes:
        id: dataset-unique id, usable as a file stem (e.g. ``"000000000139"``).
        image_path: the image file (not decoded).
        label: ``(H, W)`` int64 class ids in ``[0, num_classes)`` or the dataset's ignore index.
        meta: reader-specific extras; always ``"label_path"`` (str).
    """

    id: str
    image_path: Path
    label: NDArray[np.int64]
    meta: dict[str, Any] = field(default_factory=dict)

    def open_image(self) -> Image.Image:
        """The image as an RGB ``PIL.Image`` (decoded on demand)."""
        from PIL import Image

        with Image.open(self.image_path) as img:
            return img.convert("RGB")


@dataclass(frozen=True)
class _Item:
    id: str
    image_path: Path
    label_path: Path
    meta: Mapping[str, Any] = field(default_factory=dict)


class SegmentationDataset:
    """Base class of the readers: an indexable, shardable list of :class:`Sample`.

    Subclasses set :attr:`name`, build the item list in ``__init__`` and call
    ``super().__init__``; they override :meth:`_convert_label` when raw label values need a
    mapping.

    Attributes:
        name: registry name.
        class_names: names of the label ids ``0..num_classes-1``.
        ignore_index: label value of pixels that are not scored.
        root: the dataset folder actually used (after looking in common sub-folders).
        split: the split read.
    """

    name: ClassVar[str] = ""
    default_split: ClassVar[str | None] = "val"

    def __init__(
        self,
        *,
        root: Path,
        split: str | None,
        items: Sequence[_Item],
        class_names: Sequence[str],
        ignore_index: int | None = 255,
    ) -> None:
        self.root = root
        self.split = split
        self.class_names: tuple[str, ...] = tuple(class_names)
        self.ignore_index = ignore_index
        self._items: list[_Item] = list(items)

    # ---- sequence protocol

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Sample:
        item = self._items[index]
        label = self._convert_label(_read_label_file(item.label_path, self.name), item)
        return Sample(item.id, item.image_path, label, {"label_path": str(item.label_path), **item.meta})

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, len={len(self)}, root={self.root})"

    # ---- properties

    @property
    def ids(self) -> list[str]:
        """Sample ids in order."""
        return [item.id for item in self._items]

    @property
    def num_classes(self) -> int:
        """Number of scored classes (``len(class_names)``)."""
        return len(self.class_names)

    def file_sizes(self, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((W, H) of the image, (W, H) of the label)`` of one sample, read from the file headers (no decoding)."""
        from PIL import Image, UnidentifiedImageError

        item = self._items[index]
        sizes = []
        for path, what in ((item.image_path, "image"), (item.label_path, "label")):
            try:
                with Image.open(path) as im:
                    sizes.append((int(im.size[0]), int(im.size[1])))
            except FileNotFoundError:
                raise DatasetError(f"{self.name}: {what} file {path} is missing") from None
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
                raise DatasetError(f"{self.name}: cannot read {what} file {path}: {err}") from None
        return sizes[0], sizes[1]

    def index(self, sample_id: str) -> int:
        """Position of the sample with this id."""
        for i, item in enumerate(self._items):
            if item.id == sample_id:
                return i
        raise KeyError(sample_id)

    # ---- views

    def _view(self, items: Sequence[_Item]) -> SegmentationDataset:
        view = copy.copy(self)
        view._items = list(items)
        return view

    def shard(self, rank: int, world: int) -> SegmentationDataset:
        """Every ``world``-th sample starting at ``rank`` (balanced, disjoint, covering)."""
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"shard needs 0 <= rank < world, got rank={rank}, world={world}")
        return self._view(self._items[rank::world])

    def take(self, n: int) -> SegmentationDataset:
        """The first ``n`` samples."""
        if n < 0:
            raise ConfigError(f"take needs n >= 0, got {n}")
        return self._view(self._items[:n])

    def reversed(self) -> SegmentationDataset:
        """The samples in reverse order (GoCA's Pascal-Context subset is the first 3,000 of the reversed list)."""
        return self._view(self._items[::-1])

    def select(self, ids: Sequence[str]) -> SegmentationDataset:
        """The samples with these ids, in the given order; unknown ids raise :class:`DatasetError`."""
        by_id = {item.id: item for item in self._items}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DatasetError(f"{self.name}: {len(missing)} id(s) not in split {self.split!r}, e.g. {missing[0]!r}")
        return self._view([by_id[i] for i in ids])

    # ---- label conversion

    def _convert_label(self, raw: NDArray[Any], item: _Item) -> NDArray[np.int64]:
        """Map the raw label values of one file to ``(H, W)`` int64 class ids / ignore index."""
        return raw.astype(np.int64)


# --------------------------------------------------------------------------------------------
# registry front-end

_GENERIC_OPTIONS = ("ids", "limit", "reverse")


def create_dataset(
    name: str,
    root: str | Path,
    split: str | None = None,
    *,
    ids: Sequence[str] | None = None,
    limit: int | None = None,
    reverse: bool = False,
    **kwargs: Any,
) -> SegmentationDataset:
    """Build a registered dataset reader.

    Args:
        name: a name from :func:`list_datasets`.
        root: the dataset folder (common parent folders are also accepted, see each reader).
        split: split to read; None gives the reader's default.
        ids: keep only these sample ids, in this order.
        reverse: reverse the sample order (applied before ``limit``).
        limit: keep the first ``limit`` samples.
        **kwargs: reader-specific options.

    Example:
        >>> create_dataset("cityscapes27", "/data/cityscapes", split="val")  # doctest: +SKIP
    """
    cls = DATASETS.get(name)
    accepted = [
        p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"dataset {name!r} has no option(s) {', '.join(unknown)}; "
            f"options: {', '.join([*accepted, *_GENERIC_OPTIONS]) or 'none'}"
        )
    factory: Callable[..., SegmentationDataset] = cls  # readers take (root, split, **options)
    ds = factory(Path(root), cls.default_split if split is None else split, **kwargs)
    if ids is not None:
        ds = ds.select(list(ids))
    if reverse:
        ds = ds.reversed()
    if limit is not None:
        ds = ds.take(limit)
    return ds


def list_datasets(pattern: str = "*") -> list[str]:
    """Sorted names of registered dataset readers matching a glob pattern."""
    return DATASETS.list(pattern)


# --------------------------------------------------------------------------------------------
# helpers for readers


def _read_label_file(path: Path, dataset: str) -> NDArray[Any]:
    """Read a single-channel label image as ``(H, W)`` integer array (palette PNGs give indices)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise DatasetError(f"{dataset}: label file {path} is missing") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"{dataset}: cannot read label file {path}: {err}") from None
    with img:
        if img.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA"):
            raise DatasetError(
                f"{dataset}: label {path} is a {img.mode} image; expected a single-channel "
                "(palette or grayscale) label file with class ids as pixel values"
            )
        try:
            arr = np.array(img)
        except OSError as err:  # truncated file
            raise DatasetError(f"{dataset}: cannot read label file {path}: {err}") from None
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    return arr


def _check_root(root: Path, dataset: str) -> None:
    if not root.exists():
        raise DatasetError(f"{dataset}: dataset root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{dataset}: dataset root {root} is not a folder")


def _find_root(root: Path, dataset: str, subdirs: Sequence[str], marker: str, hint: str) -> Path:
    """The first of ``root/<subdir>`` that contains ``marker`` (a relative folder path)."""
    _check_root(root, dataset)
    for sub in subdirs:
        base = root / sub if sub else root
        if (base / marker).is_dir():
            return base
    where = ", ".join(str((root / s) / marker if s else root / marker) for s in subdirs)
    raise DatasetError(f"{dataset}: expected folder {root / marker} ({hint}); looked for: {where}")


def _first_dir(base: Path, dataset: str, candidates: Sequence[str], hint: str) -> Path:
    """The first existing folder among ``base/<candidate>``."""
    _check_root(base, dataset)
    for cand in candidates:
        if (base / cand).is_dir():
            return base / cand
    where = ", ".join(str(base / c) for c in candidates)
    raise DatasetError(f"{dataset}: expected folder {base / candidates[0]} ({hint}); looked for: {where}")


def _read_id_list(path: Path, dataset: str, hint: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{dataset}: expected file {path} ({hint})")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _check_files(items: Sequence[_Item], dataset: str) -> None:
    """Raise naming the first missing image or label (and how many are missing)."""
    for kind in ("image_path", "label_path"):
        missing = [getattr(i, kind) for i in items if not getattr(i, kind).is_file()]
        if missing:
            what = "image" if kind == "image_path" else "label"
            raise DatasetError(f"{dataset}: {len(missing)} {what} file(s) missing, e.g. {missing[0]}")


def _lut(mapping: Mapping[int, int], size: int = 256, *, default: int = -1) -> NDArray[np.int64]:
    """Lookup table raw value -> label; ``default`` (-1) marks values that must not occur."""
    table = np.full(size, default, dtype=np.int64)
    for k, v in mapping.items():
        table[int(k)] = int(v)
    return table


def _zero_label_table(
    num_labels: int, names: list[str], *, keep_zero: bool
) -> tuple[NDArray[np.int64], list[str]]:
    """Label tables of layouts whose label 0 is "background"/"other": kept as class 0 named background, or
    ignored (255) with labels 1..num_labels-1 shifted down by one; 255 stays ignored."""
    if keep_zero:
        return _lut({k: k for k in range(num_labels)} | {255: 255}), ["background", *names]
    return _lut({0: 255, 255: 255} | {k: k - 1 for k in range(1, num_labels)}), list(names)


def _apply_lut(raw: NDArray[Any], table: NDArray[np.int64], dataset: str, path: Path) -> NDArray[np.int64]:
    """Map raw label values through ``table``; values outside it or mapped to -1 raise."""
    if raw.size and (raw.min() < 0 or raw.max() >= table.size):
        raise DatasetError(f"{dataset}: label {path} has value {int(raw.max())} outside 0..{table.size - 1}")
    out: NDArray[np.int64] = table[raw]
    if (out < 0).any():
        bad = np.unique(raw[out < 0])[:5].tolist()
        raise DatasetError(f"{dataset}: label {path} has unexpected value(s) {bad}; is this the right label folder?")
    return out


def data_file(name: str) -> Path:
    """Path of a data file shipped in ``attnseg/eval/data``."""
    return Path(str(resources.files("attnseg.eval").joinpath("data", name)))


@cache
def load_json(name: str) -> dict[str, Any]:
    """A JSON data file shipped in ``attnseg/eval/data`` (cached; do not mutate)."""
    with open(data_file(name), encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data
