"""Resumable, shardable evaluation of a segmentation method on a dataset.

A run lives in one folder (``--out RUNDIR``)::

    RUNDIR/config.json               what defines the run (written once; a restart must match it)
    RUNDIR/results-<rank>.jsonl      one line per finished image, appended and fsync'ed at once
    RUNDIR/stores/<id>.safetensors   optional cache of the captured attention (``cache_stores``)
    RUNDIR/report.json, report.md    written when every image is done (or by ``attnseg report``)

Per image (METHODS.md "Evaluation" of §2-5):

1. read the image and its label; bring the image to the model's input size as the protocol says
   (centre crop + bilinear resize, or a squash resize) and apply the **same crop** to the label;
2. capture attention with the model (or load the cached store when its capture settings match)
   and run the method; semantic methods get their class names from the protocol's class source;
3. bring prediction and label to one size: the label is nearest-resized to the model input
   (DiffSeg: "labels cropped like the image and resized with nearest"), or the prediction is resized
   to the (cropped) label's size (nearest for ids; bilinear on class scores then argmax for semantic
   methods, as GoCA's evaluation does);
4. score it and append ``{id, index, metrics, counts, timings}`` to ``results-<rank>.jsonl``.

A killed run resumes with the same command: finished ids are read from every results file (a torn
last line is dropped) and skipped. Every random draw of an image is seeded by
:func:`image_seed` (run seed + image id), so results do not depend on the order, on restarts or on the
number of processes. Under ``accelerate launch`` / ``torchrun`` each process evaluates
``dataset.shard(rank, world)``; the report merges the integer counts of all files, which gives exactly
the numbers of a single process.

Example:
    >>> run = EvaluationRun("runs/ds", dataset="generic", root="data/toy", method="diffseg",
    ...                     params={"num_anchors": 4}, model="toyworld", limit=8)  # doctest: +SKIP
    >>> summary = run.run()  # doctest: +SKIP
    >>> summary.report["metrics"]["miou"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from attnseg.errors import AttnSegError, ConfigError, DatasetError
from attnseg.eval.report import (
    CONFIG_NAME,
    RESULTS_GLOB,
    RUN_FORMAT,
    Scorer,
    build_report,
    make_scorer,
    offset_key,
    read_config,
    read_jsonl,
    read_results,
    write_json_atomic,
)

if TYPE_CHECKING:
    from PIL import Image

    from attnseg.capture.store import AttentionStore
    from attnseg.eval.datasets.base import Sample, SegmentationDataset
    from attnseg.eval.protocols import Protocol
    from attnseg.models.base import DiffusionAdapter
    from attnseg.pipeline import AttentionSegmentationPipeline
    from attnseg.types import SegmentationResult

__all__ = [
    "METHOD_KINDS",
    "EvalSummary",
    "EvaluationRun",
    "Geometry",
    "detect_distributed",
    "evaluate",
    "geometry_for",
    "image_seed",
    "method_kind",
]

MethodKind = Literal["class-agnostic", "semantic", "binary"]
METHOD_KINDS: tuple[str, ...] = ("class-agnostic", "semantic", "binary")

# Matchings each kind of method can be scored with (the first is the default without a protocol).
_KIND_MATCHINGS: dict[str, tuple[str, ...]] = {
    "class-agnostic": ("per-image-hungarian", "dataset-hungarian", "best-match"),
    "semantic": ("semantic", "per-image-hungarian", "dataset-hungarian", "best-match"),
    "binary": ("binary",),
}
_KIND_ALIASES = {
    "class-agnostic": "class-agnostic", "agnostic": "class-agnostic", "unsupervised": "class-agnostic",
    "instance": "class-agnostic", "semantic": "semantic", "open-vocabulary": "semantic",
    "binary": "binary", "target": "binary",
}
# GoCA's background-offset sweep: -0.4 .. 0.4, step 0.1 (``downstream_dispatch.py``).
GOCA_OFFSETS: tuple[float, ...] = tuple(round(-0.4 + 0.1 * k, 1) for k in range(9))
_BACKGROUND_NAMES = ("background",)
_RUN_VERSION = 1


# --------------------------------------------------------------------------------------------
# small public helpers


def image_seed(seed: int, image_id: str) -> int:
    """Seed of one image: a 63-bit hash of the run seed and the image id (independent of order and sharding)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def method_kind(method: str | type | object) -> MethodKind:
    """What a method's output means, which decides how it is scored.

    - ``"class-agnostic"``: arbitrary segment ids (DiffSeg, clustering) -> Hungarian / best-match;
    - ``"semantic"``: one id per named class; the method takes ``classes=[...]`` (GoCA) -> confusion matrix;
    - ``"binary"``: one target concept; the method takes ``target="..."`` -> binary scores.

    A method class may say so itself with a class attribute ``kind`` (or ``output_kind``); otherwise its
    keyword-only parameters decide (``classes`` -> semantic, ``target`` -> binary, else class-agnostic).
    """
    if isinstance(method, str):
        from attnseg.methods.base import METHODS, list_methods

        list_methods()  # imports the built-in methods so that they are registered
        method = METHODS.get(method)
    cls = method if isinstance(method, type) else type(method)
    for attr in ("output_kind", "kind"):
        value = getattr(cls, attr, None)
        if isinstance(value, str) and value.lower() in _KIND_ALIASES:
            return _KIND_ALIASES[value.lower()]  # type: ignore[return-value]
    params = _keyword_params(cls)
    if "classes" in params:
        return "semantic"
    if "target" in params:
        return "binary"
    return "class-agnostic"


def _keyword_params(cls: type) -> dict[str, inspect.Parameter]:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return {}
    return {n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def detect_distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of this process.

    ``RANK``/``WORLD_SIZE`` (set by ``torchrun`` and ``accelerate launch`` for several processes) win; else,
    when the process was started by ``accelerate launch`` (``ACCELERATE_*`` variables) and accelerate is
    installed, ``accelerate.PartialState()`` decides; else ``(0, 1)``.
    """
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is not None and world is not None:
        try:
            r, w = int(rank), int(world)
        except ValueError:
            raise ConfigError(f"RANK={rank!r} and WORLD_SIZE={world!r} must be integers") from None
        if w < 1 or not 0 <= r < w:
            raise ConfigError(f"RANK={r} must lie in [0, WORLD_SIZE={w})")
        return r, w
    if any(k.startswith("ACCELERATE_") for k in os.environ):
        try:
            from accelerate import PartialState
        except ImportError:
            return 0, 1
        state = PartialState()
        return int(state.process_index), int(state.num_processes)
    return 0, 1


def _resolve_device(device: str, world: int) -> str:
    """``"auto"``: CUDA when available; with several processes on one machine, ``cuda`` means ``cuda:<LOCAL_RANK>``."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1 and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("attnseg", "torch", "diffusers", "transformers", "numpy", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _jsonable(value: Any) -> Any:
    """JSON round trip (tuples -> lists, numpy scalars -> numbers); anything else becomes its repr."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else repr(o)))


# --------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class Geometry:
    """How images, labels and predictions are brought to one size.

    Attributes:
        crop: ``"center-crop"`` (crop to the input's aspect ratio, then bilinear resize; the label gets
            the same crop), ``"resize"`` (squash the whole image; the label is not cropped), ``"pad"``
            (letterbox the whole image; the prediction is cut back to the image, padding never scored) or
            ``"native"`` (the image's aspect ratio at about the input's area; models that accept it). With
            ``"pad"`` and ``"native"`` predictions are scored at the label size.
        score_at: ``"input"`` (the cropped label is nearest-resized to the model input size and scored
            there) or ``"label"`` (the prediction is resized to the cropped label's size).
        upsample: how a prediction is resized: ``"nearest"`` (ids) or ``"bilinear-scores"`` (semantic
            methods with per-class scores: bilinear on the scores, then argmax; ids otherwise nearest).
    """

    crop: Literal["center-crop", "resize", "pad", "native"] = "center-crop"
    score_at: Literal["label", "input"] = "label"
    upsample: Literal["nearest", "bilinear-scores"] = "nearest"

    def __post_init__(self) -> None:
        if self.crop not in ("center-crop", "resize", "pad", "native"):
            raise ConfigError(f"crop must be 'center-crop', 'resize', 'pad' or 'native', got {self.crop!r}")
        if self.crop in ("pad", "native") and self.score_at == "input":
            raise ConfigError(f"crop {self.crop!r} scores at the label size: score_at must be 'label'")
        if self.score_at not in ("label", "input"):
            raise ConfigError(f"score_at must be 'label' or 'input', got {self.score_at!r}")
        if self.upsample not in ("nearest", "bilinear-scores"):
            raise ConfigError(f"upsample must be 'nearest' or 'bilinear-scores', got {self.upsample!r}")

    def describe(self) -> str:
        """One sentence for reports."""
        if self.crop == "center-crop":
            first = ("image centre-cropped to the input aspect ratio and resized (bilinear) to the input size; "
                     "label cropped with the same box")
        elif self.crop == "pad":
            first = ("image letterboxed (aspect ratio kept, bilinear) into the input, grey padding; prediction cut "
                     "back to the image box, padding never scored; label not cropped")
        elif self.crop == "native":
            first = ("image resized (bilinear) to an input of its own aspect ratio and about the input's area; "
                     "label not cropped")
        else:
            first = "image resized (bilinear, squashed, no crop) to the input size; label not cropped"
        if self.score_at == "input":
            second = "label nearest-resized to the input size and scored there"
        else:
            how = ("bilinear on class scores then argmax (ids nearest when there are no scores)"
                   if self.upsample == "bilinear-scores" else "nearest")
            second = f"prediction resized to the label size ({how}) and scored at the label size"
        return f"{first}; {second}"

    def to_dict(self) -> dict[str, str]:
        return {"crop": self.crop, "score_at": self.score_at, "upsample": self.upsample,
                "description": self.describe()}


def geometry_for(protocol: Protocol) -> Geometry:
    """The geometry a registered protocol's ``preprocessing`` text prescribes.

    ``"center-crop"`` in the text -> centre crop, else squash resize; ``"nearest label"`` -> labels are
    resized to the input (DiffSeg), else predictions go to the label size; semantic matching upsamples
    class scores bilinearly (GoCA G7).
    """
    text = protocol.preprocessing.lower()
    crop: Literal["center-crop", "resize"] = "center-crop" if "center-crop" in text or "centre-crop" in text \
        else "resize"
    score_at: Literal["label", "input"] = "input" if "nearest label" in text else "label"
    upsample: Literal["nearest", "bilinear-scores"] = "bilinear-scores" if protocol.matching == "semantic" \
        else "nearest"
    return Geometry(crop=crop, score_at=score_at, upsample=upsample)


def _crop_box(width: int, height: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Centre box ``(left, top, right, bottom)`` of a ``width x height`` picture with the aspect ratio of
    ``size = (H, W)`` (the rule of :func:`attnseg.models.unet.resize_image`)."""
    h, w = size
    scale = max(w / width, h / height)
    cw, ch = min(width, round(w / scale)), min(height, round(h / scale))
    left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, left + cw, top + ch


def _resize_ids(ids: NDArray[np.int64], size: tuple[int, int]) -> NDArray[np.int64]:
    """Nearest resize of an ``(H, W)`` int64 id map to ``size = (H', W')`` (torch ``mode="nearest"``)."""
    if tuple(ids.shape) == tuple(size):
        return ids
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(ids)).to(torch.float64)[None, None]
    return F.interpolate(t, size=size, mode="nearest")[0, 0].to(torch.int64).numpy()


# --------------------------------------------------------------------------------------------
# run


@dataclass
class EvalSummary:
    """What :meth:`EvaluationRun.run` did in this process.

    Attributes:
        rundir: the run folder.
        rank, world_size: this process and how many share the run.
        total: images of the whole run.
        shard_total: images of this process's shard.
        done_before: images of this shard already finished when the run (re)started.
        done_now: images finished by this call.
        report: the report when every image of the run is done (built by the process that finished last),
            else None.
    """

    rundir: Path
    rank: int
    world_size: int
    total: int
    shard_total: int
    done_before: int
    done_now: int
    report: dict[str, Any] | None = None
    stores: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.report is not None and bool(self.report.get("complete"))


class EvaluationRun:
    """One evaluation: a dataset (or a protocol that fixes it), a method, a model and a run folder.

    Construction validates everything cheap (dataset layout, protocol, method parameters, class source)
    and never touches ``out``; :meth:`prepare` writes or checks ``config.json``; :meth:`run` loads the model
    and evaluates the images this process still has to do.

    Args:
        out: the run folder (``RUNDIR``).
        dataset: a reader name from :func:`attnseg.eval.datasets.list_datasets`; optional with ``protocol``.
        root: the dataset folder.
        protocol: a registered protocol name (fixes dataset, split, preprocessing, matching, background and
            class source; ``"name@vN"`` checks the version).
        method: a registered method name.
        params: the method's hyper-parameters (``classes`` is supplied per image for semantic methods).
        model: Hub id, local diffusers folder or ``"toyworld"`` (default; with ``adapter``, the adapter's name).
        split: dataset split (a protocol's split, or its held-out split for a tuning run).
        dataset_options: reader options, e.g. ``{"num_classes": 5}`` for the generic layout (not with a protocol).
        limit: evaluate only the first ``limit`` images (after the protocol's own selection).
        seed: run seed; every image is seeded with :func:`image_seed`.
        class_source: semantic methods only, without a protocol: ``"oracle"``, ``"vocabulary"`` (default)
            or ``"captions"``.
        captions: JSON file ``{image id: [class names]}`` for ``class_source="captions"``.
        matching: without a protocol, override the default matching of the method's kind.
        background_offset: semantic methods: a fixed offset added to the background channel's scores
            (needed by ``*-held-out`` protocols such as ``goca-voc``: take it from a run on the held-out split).
        size: square model input size in pixels (default: the protocol's resolution, else the model's).
        crop, score_at: geometry without a protocol (see :class:`Geometry`).
        dtype, device: model precision and device (``"auto"``: CUDA when available).
        cache_stores: save each image's attention under ``store_dir`` and reuse stores whose capture
            settings match (another method hyper-parameter needs no model pass).
        store_dir: where stores are cached (default ``RUNDIR/stores``; point it at another run's stores to
            re-use them); implies ``cache_stores``.
        overwrite: discard the results of a previous run in ``out`` (cached stores are kept).
        rank, world_size: this process's shard (default: :func:`detect_distributed`).
        adapter: an already loaded model adapter (``model`` is then only recorded).
    """

    def __init__(
        self,
        out: str | Path,
        *,
        dataset: str | None = None,
        root: str | Path | None = None,
        protocol: str | None = None,
        method: str = "diffseg",
        params: Mapping[str, Any] | None = None,
        model: str | None = None,
        split: str | None = None,
        dataset_options: Mapping[str, Any] | None = None,
        limit: int | None = None,
        seed: int = 0,
        class_source: str | None = None,
        captions: str | Path | None = None,
        matching: str | None = None,
        background_offset: float | None = None,
        size: int | None = None,
        crop: str | None = None,
        score_at: str | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        cache_stores: bool = False,
        store_dir: str | Path | None = None,
        overwrite: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        adapter: DiffusionAdapter | None = None,
    ) -> None:
        from attnseg.eval.datasets import create_dataset
        from attnseg.eval.protocols import Protocol, get_protocol
        from attnseg.methods.base import METHODS, create_method, list_methods

        self.out = Path(out)
        if rank is None or world_size is None:
            r, w = detect_distributed()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        if overwrite and self.world_size > 1:
            raise ConfigError(
                "--overwrite cannot be used with several processes (they cannot agree on when the old results "
                f"are gone); delete {self.out} first, or use a new --out folder"
            )
        self.overwrite = overwrite
        if root is None:
            raise ConfigError("the dataset root is required (--root DIR)")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"limit must be a positive integer, got {limit!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"size must be a positive integer, got {size!r}")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")

        # ---- method and its kind
        list_methods()  # imports the built-in methods so that they are registered
        method_cls = METHODS.get(method)
        kind = method_kind(method_cls)
        user_params = dict(params or {})
        if kind == "semantic" and "classes" in user_params:
            raise ConfigError(
                f"method {method!r} gets its classes from the class source (--class-source), not from -P classes="
            )
        accepted = _keyword_params(method_cls)
        unknown = sorted(set(user_params) - set(accepted))
        if unknown:
            raise ConfigError(
                f"method {method!r} has no parameter {', '.join(unknown)}; "
                f"its parameters: {', '.join(sorted(accepted))}"
            )

        # ---- protocol (registered, or an ad-hoc one described with the same fields)
        proto: Protocol | None = get_protocol(protocol) if protocol else None
        if proto is not None:
            if dataset is not None and dataset != proto.dataset:
                raise ConfigError(f"protocol {proto.name!r} evaluates dataset {proto.dataset!r}, not {dataset!r}")
            if dataset_options:
                raise ConfigError(f"protocol {proto.name!r} fixes the dataset options; drop --dataset-option")
            if split is not None and split not in (proto.split, proto.held_out_split):
                allowed = " or ".join(repr(s) for s in (proto.split, proto.held_out_split) if s)
                raise ConfigError(f"protocol {proto.name!r} evaluates split {allowed}, not {split!r}")
            geometry = geometry_for(proto)
            fixed = {"matching": proto.matching, "class_source": proto.class_source, "crop": geometry.crop,
                     "score_at": geometry.score_at}
            for name, value in (("matching", matching), ("class_source", class_source), ("crop", crop),
                                ("score_at", score_at)):
                if value is not None and value != fixed[name]:
                    raise ConfigError(
                        f"protocol {proto.name!r} fixes {name} = {fixed[name]!r}; drop --{name.replace('_', '-')}"
                    )
            if proto.matching not in _KIND_MATCHINGS[kind]:
                raise ConfigError(
                    f"protocol {proto.name!r} scores {proto.matching!r} predictions, but {method!r} is a "
                    f"{kind} method; use a method whose output fits ({', '.join(_methods_for(proto.matching))})"
                )
            dataset = proto.dataset
            split = proto.split if split is None else split
            ds_options: dict[str, Any] = proto.dataset_kwargs
            matching = proto.matching
            class_source = proto.class_source
        else:
            if dataset is None:
                raise ConfigError("give --dataset NAME (with --root DIR) or --protocol NAME")
            ds_options = dict(dataset_options or {})
            matching = matching or _KIND_MATCHINGS[kind][0]
            if matching not in _KIND_MATCHINGS[kind]:
                raise ConfigError(
                    f"a {kind} method cannot be scored with matching {matching!r}; use one of "
                    f"{', '.join(_KIND_MATCHINGS[kind])}"
                )
            if kind == "semantic":
                class_source = class_source or "vocabulary"
            elif class_source not in (None, "none"):
                raise ConfigError(f"{method!r} is a {kind} method; it takes no class names (drop --class-source)")
            else:
                class_source = "none"
            geometry = Geometry(
                crop=crop or "center-crop",  # type: ignore[arg-type]
                score_at=score_at or "label",  # type: ignore[arg-type]
                upsample="bilinear-scores" if matching == "semantic" else "nearest",
            )
        if kind == "semantic" and class_source == "none":
            raise ConfigError(f"{method!r} is a semantic method and needs class names (--class-source)")
        if class_source not in ("none", "oracle", "vocabulary", "captions"):
            raise ConfigError(f"class source must be oracle, vocabulary or captions, got {class_source!r}")
        self.protocol_obj = proto
        self.kind: MethodKind = kind
        self.geometry = geometry
        self.class_source = class_source

        # ---- dataset
        ds = create_dataset(dataset, root, split, **ds_options)
        if limit is not None:
            ds = ds.take(limit)
        if len(ds) == 0:
            raise DatasetError(f"{dataset}: no images to evaluate")
        if not ds.class_names:
            raise DatasetError(
                f"{dataset} at {ds.root} has no class names: add classes.txt (one name per line) or pass "
                "--dataset-option num_classes=N"
            )
        if proto is not None and proto.num_classes != ds.num_classes:
            raise DatasetError(
                f"protocol {proto.name!r} scores {proto.num_classes} classes but {dataset} at {ds.root} has "
                f"{ds.num_classes}"
            )
        self.dataset: SegmentationDataset = ds
        self.ids: list[str] = ds.ids
        if len(set(self.ids)) != len(self.ids):
            raise DatasetError(f"{dataset}: image ids are not unique")
        self._names = {n.lower(): i for i, n in enumerate(ds.class_names)}
        self.background_id: int | None = next(
            (self._names[n] for n in _BACKGROUND_NAMES if n in self._names), None
        )

        # ---- class source inputs
        self.captions: dict[str, list[str]] | None = None
        captions_digest = None
        if class_source == "captions":
            if captions is None:
                raise ConfigError("class source 'captions' needs --captions FILE (JSON: image id -> list of names)")
            self.captions, captions_digest = _read_captions(Path(captions), self.ids)
        elif captions is not None:
            raise ConfigError("--captions is only used with --class-source captions")

        # ---- background handling (semantic scoring)
        background, self.offsets, select = _background_plan(proto, matching, split, background_offset)
        if self.offsets is not None and self.background_id is None:
            raise ConfigError(f"{dataset} has no 'background' class, so a background offset cannot be applied")

        # ---- method parameters: validated now, recorded with their defaults
        self.method_name = method
        self.user_params = user_params
        probe = dict(user_params)
        if kind == "semantic":
            probe["classes"] = [n for i, n in enumerate(ds.class_names) if i != self.background_id][:1] or ["object"]
        try:
            self._method = create_method(method, **probe)
        except TypeError as exc:  # e.g. a required hyper-parameter (target=...) is missing
            raise ConfigError(f"method {method!r}: {exc}") from None
        full = {n: p.default for n, p in accepted.items() if p.default is not inspect.Parameter.empty}
        full.update(user_params)
        full.pop("classes", None)
        self.method_params = _jsonable(full)

        # ---- binary positive class
        positive = None
        if matching == "binary":
            positive = self._positive_class(user_params.get("target"))

        # ---- model, size
        if model is None:
            model = (getattr(adapter, "name", "") or type(adapter).__name__) if adapter is not None else "toyworld"
        model_id = str(Path(model).resolve()) if Path(model).exists() else model
        self.model_id = model_id
        self.adapter = adapter
        self.dtype = dtype
        self.device = _resolve_device(device, self.world_size)
        self.size = size or (proto.resolution if proto is not None else None)
        self.seed = seed
        self.cache_stores = bool(cache_stores or store_dir is not None)
        self.store_dir = Path(store_dir) if store_dir is not None else self.out / "stores"

        # ---- protocol record (ad-hoc runs are described with the same fields)
        if proto is not None:
            protocol_dict = proto.to_dict()
        else:
            metrics = {"semantic": ("miou", "miou_absent_as_zero", "pixel_accuracy"),
                       "binary": ("miou", "accuracy", "precision", "f1", "iou", "recall"),
                       "best-match": ("best_match_iou",)}.get(matching, ("miou", "pixel_accuracy"))
            protocol_dict = Protocol(
                name="custom", version=1, dataset=dataset, split=str(ds.split), preprocessing=geometry.describe(),
                resolution=self.size, matching=matching, background=background, class_source=class_source,
                num_classes=ds.num_classes, metrics=metrics,
                notes="Ad-hoc evaluation (no registered protocol).", source="attnseg evaluate",
                dataset_options=tuple(ds_options.items()),
            ).to_dict()
        self.protocol = protocol_dict
        primary = protocol_dict["metrics"][0] if protocol_dict["metrics"] else "miou"
        self.scoring: dict[str, Any] = {
            "matching": matching,
            "num_classes": ds.num_classes,
            "ignore_index": ds.ignore_index,
            "class_names": list(ds.class_names),
            "offsets": self.offsets,
            "select": select,
            "primary": primary,
            "positive": positive,
        }
        self.scorer: Scorer = make_scorer(self.scoring)
        self.matching = matching
        self.identity = {
            "protocol": protocol_dict["id"],
            "dataset": {"name": dataset, "split": ds.split, "options": _jsonable(ds_options),
                        "num_images": len(self.ids), "ids_sha256": _digest(self.ids), "limit": limit},
            "method": {"name": method, "kind": kind, "params": self.method_params},
            "model": {"id": model_id, "dtype": dtype, "size": self.size},
            "seed": seed,
            "geometry": geometry.to_dict(),
            "matching": matching,
            "class_source": class_source,
            "captions_sha256": captions_digest,
            "background_offset": background_offset,
        }
        self.settings = {
            "root": str(Path(root).resolve()),
            "device": self.device,
            "world_size": self.world_size,
            "cache_stores": self.cache_stores,
            "store_dir": str(self.store_dir.resolve()) if self.cache_stores else None,
            "captions": str(Path(captions).resolve()) if captions is not None else None,
        }
        self._prepared = False
        self.pending: list[int] = []
        self.done_before = 0
        shard = list(range(self.rank, len(self.ids), self.world_size))
        self.shard: list[int] = shard

    # ---- helpers ---------------------------------------------------------------------------

    def _positive_class(self, target: Any) -> int:
        names = self.dataset.class_names
        if isinstance(target, str) and target.lower() in self._names:
            return self._names[target.lower()]
        if len(names) == 2:
            return 1
        raise ConfigError(
            f"cannot tell which class of {self.dataset.name} is the target {target!r}; classes: {', '.join(names)}"
        )

    @property
    def config(self) -> dict[str, Any]:
        """What ``config.json`` holds."""
        return {
            "format": RUN_FORMAT,
            "version": _RUN_VERSION,
            "identity": self.identity,
            "protocol": self.protocol,
            "scoring": self.scoring,
            "settings": self.settings,
            "ids": self.ids,
            "versions": _versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    # ---- run folder --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create ``out``, write ``config.json`` (or check that the existing one describes this run) and find
        the images of this shard that are not finished yet."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        config_path = out / CONFIG_NAME
        if self.overwrite:
            for path in [*out.glob(RESULTS_GLOB), out / "report.json", out / "report.md", config_path]:
                path.unlink(missing_ok=True)
        elif not config_path.exists() and any(out.glob(RESULTS_GLOB)):
            raise ConfigError(f"{out} holds result files but no {CONFIG_NAME}; use --overwrite or a new --out folder")
        if not _create_exclusive(config_path, self.config):
            self._check_config(read_config(out))
        own = out / f"results-{self.rank}.jsonl"
        if own.exists():
            read_jsonl(own, repair=True)  # drop a torn last line before appending
        finished = read_results(out, ids=self.ids).ids
        self.pending = [i for i in self.shard if self.ids[i] not in finished]
        self.done_before = len(self.shard) - len(self.pending)
        self._prepared = True

    def _check_config(self, existing: Mapping[str, Any]) -> None:
        old = existing.get("identity", {})
        if old == _jsonable(self.identity):
            return
        diffs = _diff(old, _jsonable(self.identity))
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ConfigError(
            f"{self.out} holds a run with another configuration ({shown}); resume it with the same options, "
            "use a new --out folder, or pass --overwrite to discard it"
        )

    # ---- evaluation ----------------------------------------------------------------------------

    def _load_adapter(self) -> DiffusionAdapter:
        if self.adapter is None:
            from attnseg.models.loading import load_model

            self.adapter = load_model(self.model_id, dtype=self.dtype, device=self.device)
        return self.adapter

    def run(
        self,
        *,
        on_image: Callable[[dict[str, Any]], None] | None = None,
        on_start: Callable[[EvalSummary], None] | None = None,
        build: bool = True,
    ) -> EvalSummary:
        """Evaluate the pending images of this shard.

        Args:
            on_image: called with each record right after it is written (progress bars, tests).
            on_start: called once the model is loaded, with the summary so far (``done_before`` known).
            build: build the report when the run is complete.

        Returns:
            :class:`EvalSummary`; its ``report`` is set when every image of the run (all shards) is done.
        """
        if not self._prepared:
            self.prepare()
        from attnseg.pipeline import AttentionSegmentationPipeline

        summary = EvalSummary(
            rundir=self.out, rank=self.rank, world_size=self.world_size, total=len(self.ids),
            shard_total=len(self.shard), done_before=self.done_before, done_now=0,
        )
        if self.pending:
            adapter = self._load_adapter()
            pipe = AttentionSegmentationPipeline(adapter, self._method)
            if on_start is not None:
                on_start(summary)
            path = self.out / f"results-{self.rank}.jsonl"
            with open(path, "a", encoding="utf-8") as f:
                for index in self.pending:
                    record = self._evaluate_one(pipe, index)
                    f.write(json.dumps(record, allow_nan=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    summary.done_now += 1
                    summary.stores[record["store"]] = summary.stores.get(record["store"], 0) + 1
                    if on_image is not None:
                        on_image(record)
        elif on_start is not None:
            on_start(summary)
        if build:
            finished = read_results(self.out, ids=self.ids).ids
            if len(finished) == len(self.ids):
                summary.report = build_report(self.out)
        return summary

    def _input_size(self) -> tuple[int, int]:
        if self.size is not None:
            return int(self.size), int(self.size)
        assert self.adapter is not None
        h, w = self.adapter.resolution
        return int(h), int(w)

    def _evaluate_one(self, pipe: AttentionSegmentationPipeline, index: int) -> dict[str, Any]:
        from PIL import Image as PILImage

        from attnseg.io.images import load_image

        started = time.time()
        t0 = time.perf_counter()
        sample: Sample = self.dataset[index]
        image = load_image(sample.image_path)
        size = self._input_size()
        label = sample.label
        placement = None
        if self.geometry.crop in ("pad", "native"):
            prepared = pipe.prepare(image, size=size, fit=self.geometry.crop)  # type: ignore[arg-type]
            placement, image = prepared.placement, prepared
        elif self.geometry.crop == "center-crop":
            image = image.crop(_crop_box(image.width, image.height, size))
            lh, lw = label.shape
            left, top, right, bottom = _crop_box(lw, lh, size)
            label = label[top:bottom, left:right]
        if placement is None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), PILImage.Resampling.BILINEAR)
        target = _resize_ids(label, size) if self.geometry.score_at == "input" else label
        seed = image_seed(self.seed, sample.id)
        classes = self._classes(sample.id, label)
        t1 = time.perf_counter()

        store_state = "none"
        if self.kind == "semantic" and not classes:
            result = None  # nothing to look for: every pixel is background
            t2 = t3 = time.perf_counter()
        else:
            if self.kind == "semantic":
                from attnseg.methods.base import create_method

                pipe.method = create_method(self.method_name, **self.user_params, classes=classes)
            store, store_state = self._store(pipe, image, sample.id, seed, size)
            t2 = time.perf_counter()
            result = pipe.segment_store(store)
            if placement is not None:  # back to the image's own pixels: padding is cut away, never scored
                result = placement.result_to_original(result)
            t3 = time.perf_counter()

        pred = self._prediction(result, target.shape)
        metrics, counts = self.scorer.score(pred, target)
        t4 = time.perf_counter()
        record: dict[str, Any] = {
            "id": sample.id,
            "index": index,
            "rank": self.rank,
            "seed": seed,
            "label_size": list(target.shape),
            "metrics": metrics,
            "counts": counts,
            "store": store_state,
            "timings": {"load": round(t1 - t0, 5), "capture": round(t2 - t1, 5), "segment": round(t3 - t2, 5),
                        "score": round(t4 - t3, 5), "total": round(t4 - t0, 5)},
            "started_at": round(started, 3),
            "finished_at": round(time.time(), 3),
        }
        if classes is not None:
            record["classes"] = classes
        if result is not None:
            record["num_segments"] = int(result.num_segments)
        return record

    def _classes(self, image_id: str, label: NDArray[np.int64]) -> list[str] | None:
        """Class names given to a semantic method for one image (None for other kinds)."""
        if self.kind != "semantic":
            return None
        names = self.dataset.class_names
        if self.class_source == "oracle":
            present = np.unique(label)
            return [names[int(c)] for c in present if 0 <= c < len(names) and c != self.background_id]
        if self.class_source == "vocabulary":
            return [n for i, n in enumerate(names) if i != self.background_id]
        assert self.captions is not None
        return list(self.captions[image_id])

    # ---- attention stores ------------------------------------------------------------------------

    def _capture_signature(self, pipe: AttentionSegmentationPipeline, seed: int, size: tuple[int, int]) -> dict:
        opts = pipe.options()
        adapter = pipe.adapter
        layers = adapter.attention_layers(size)
        selected = sorted(pipe.method.select_layers(layers))
        features = getattr(pipe.method, "features", None)
        make_store = getattr(pipe.method, "make_store", None)
        random = opts.add_noise or opts.sample_posterior
        return _jsonable({
            "model": self.model_id, "dtype": self.dtype, "size": list(size), "crop": self.geometry.crop,
            "prompt": opts.prompt, "timestep": opts.timestep, "add_noise": opts.add_noise,
            "sample_posterior": opts.sample_posterior, "heads": opts.heads, "group": opts.group,
            "seed": seed if random else None, "layers": selected,
            "features": sorted(features(adapter)) if features is not None else [],
            "store": f"{type(pipe.method).__module__}.{type(pipe.method).__qualname__}" if make_store else None,
        })

    def _store(
        self, pipe: AttentionSegmentationPipeline, image: Image.Image, image_id: str, seed: int, size: tuple[int, int]
    ) -> tuple[AttentionStore, str]:
        """The image's attention store: loaded from the cache when its capture settings match, else captured."""
        if not self.cache_stores:
            store, _ = pipe.capture(image, seed=seed, size=size)
            return store, "computed"
        signature = self._capture_signature(pipe, seed, size)
        path = self.store_dir / f"{_safe_name(image_id)}.safetensors"
        if path.is_file():
            store = _load_store(path, signature)
            if store is not None:
                return store, "loaded"
        store, _ = pipe.capture(image, seed=seed, size=size)
        store.meta["capture"] = signature
        store.meta["image_id"] = image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
        store.save(tmp)
        os.replace(tmp, path)
        return store, "saved"

    # ---- predictions ------------------------------------------------------------------------------

    def _prediction(self, result: SegmentationResult | None, shape: tuple[int, ...]) -> Any:
        """The scorer's input at the label's ``shape``: an id map, or ``{offset: class-id map}`` (semantic)."""
        size = (int(shape[0]), int(shape[1]))
        if self.matching != "semantic":
            assert result is not None
            masks = _mask_set(result) if self.matching == "best-match" else None
            if masks is not None:
                return masks if tuple(masks.shape[-2:]) == size else _resize_masks(masks, size)
            return _resize_ids(_ids(result), size)
        keys = [offset_key(o) for o in self.offsets] if self.offsets is not None else ["none"]
        unknown = self.dataset.num_classes  # ids >= C are scored as wrong
        if result is None:
            fill = self.background_id if self.background_id is not None else unknown
            return {k: np.full(size, fill, dtype=np.int64) for k in keys}
        lut = self._class_lut(result)
        scores = result.scores
        use_scores = (
            self.geometry.upsample == "bilinear-scores" and scores is not None and result.label_names is not None
            and scores.ndim == 3 and scores.shape[0] == len(result.label_names)
        )
        if self.offsets is not None and not use_scores:
            raise ConfigError(
                f"background offsets need per-class scores: method {self.method_name!r} must return scores (K, H, W) "
                "with label_names naming each channel, one of them 'background'"
            )
        if not use_scores:
            ids = _resize_ids(_ids(result), size)
            return {"none": lut[ids]}
        import torch.nn.functional as F

        s = scores.detach().cpu().float()
        if tuple(s.shape[-2:]) != size:
            s = F.interpolate(s[None], size=size, mode="bilinear", align_corners=False)[0]
        if self.offsets is None:
            return {"none": lut[s.argmax(0).numpy()]}
        names = [n.lower() for n in result.label_names or ()]
        if "background" not in names:
            raise ConfigError(f"method {self.method_name!r} returned no 'background' channel to offset")
        bg = names.index("background")
        out = {}
        for offset in self.offsets:
            shifted = s.clone()
            shifted[bg] += offset
            out[offset_key(offset)] = lut[shifted.argmax(0).numpy()]
        return out

    def _class_lut(self, result: SegmentationResult) -> NDArray[np.int64]:
        """Predicted id -> dataset class id. Names outside the dataset's classes (e.g. background objects of a
        caption) count as background when the dataset has one, else as wrong (id C)."""
        unknown = self.dataset.num_classes
        if result.label_names is None:
            k = int(result.labels.max()) + 1 if result.labels.numel() else 1
            return np.array([i if i < unknown else unknown for i in range(k)], dtype=np.int64)
        fallback = self.background_id if self.background_id is not None else unknown
        lut = [self._names.get(str(n).lower(), fallback) for n in result.label_names]
        extra = max(int(result.labels.max()) + 1 if result.labels.numel() else 0, len(lut)) - len(lut)
        return np.array(lut + [unknown] * extra, dtype=np.int64)


def _digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _mask_set(result: SegmentationResult) -> NDArray[np.bool_] | None:
    """A method's set of possibly overlapping masks ``(K, H, W)`` bool: boolean ``scores``, or float ``scores`` with
    ``meta["scores_are_masks"]`` (thresholded at 0.5); None when the segments of ``labels`` are the masks."""
    scores = result.scores
    if scores is None or scores.ndim != 3:
        return None
    import torch

    if scores.dtype == torch.bool:
        return np.asarray(scores.detach().cpu().numpy(), dtype=bool)
    if result.meta.get("scores_are_masks"):
        return np.asarray((scores.detach().cpu().float() > 0.5).numpy(), dtype=bool)
    return None


def _resize_masks(masks: NDArray[np.bool_], size: tuple[int, int]) -> NDArray[np.bool_]:
    """Nearest resize of ``(K, H, W)`` bool masks to ``size = (H', W')``."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(masks)).to(torch.float32)[None]
    return (F.interpolate(t, size=size, mode="nearest")[0] > 0.5).numpy()


def _ids(result: SegmentationResult) -> NDArray[np.int64]:
    """``result.labels`` as an ``(H, W)`` int64 numpy array."""
    return np.asarray(result.labels.detach().cpu().numpy(), dtype=np.int64)


def _background_plan(
    proto: Protocol | None, matching: str, split: str | None, offset: float | None
) -> tuple[str, list[float] | None, str]:
    """``(background mode, offsets to score, selection)`` of a run.

    Semantic runs add an offset to the background channel before the argmax (GoCA G7). The offsets swept are
    -0.4..0.4 (step 0.1) for ``oracle-threshold`` protocols and for tuning runs of ``held-out-threshold``
    protocols (their held-out split), where the best is selected; otherwise one fixed offset (``--background-offset``
    or ``threshold:<value>``), or none at all.
    """
    if matching != "semantic":
        if offset is not None:
            raise ConfigError("--background-offset applies to semantic methods only")
        return "none", None, "none"
    if proto is None:
        if offset is None:
            return "none", None, "none"
        return f"threshold:{float(offset)}", [float(offset)], offset_key(offset)
    background = proto.background
    tuning = background == "held-out-threshold" and split == proto.held_out_split
    if background == "oracle-threshold" or tuning:
        if offset is not None:
            raise ConfigError("this run sweeps the background offset and selects the best; drop --background-offset")
        return background, list(GOCA_OFFSETS), "best"
    if background == "held-out-threshold":
        if offset is None:
            raise ConfigError(
                f"protocol {proto.name!r} fixes the background offset on the held-out split {proto.held_out_split!r}: "
                f"run it first with --split {proto.held_out_split} (which sweeps the offsets), then pass the best "
                "one with --background-offset"
            )
        return background, [float(offset)], offset_key(offset)
    if proto.threshold is not None:
        if offset is not None and float(offset) != proto.threshold:
            raise ConfigError(f"protocol {proto.name!r} fixes the background offset at {proto.threshold}")
        return background, [proto.threshold], offset_key(proto.threshold)
    if offset is not None:
        raise ConfigError(f"protocol {proto.name!r} has no background offset (background {background!r})")
    return background, None, "none"


def _methods_for(matching: str) -> list[str]:
    kinds = [k for k, m in _KIND_MATCHINGS.items() if matching in m]
    return [f"{k} methods" for k in kinds] or ["none"]


def _safe_name(image_id: str) -> str:
    """A file stem for an image id: the id itself when it is safe, else a sanitised id plus a short hash."""
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in image_id)
    if safe == image_id and not image_id.startswith("."):
        return image_id
    return f"{safe.lstrip('.')}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def _load_store(path: Path, signature: Mapping[str, Any]) -> AttentionStore | None:
    """A cached store whose capture settings equal ``signature``, else None (it is then captured again)."""
    from attnseg.capture.store import AttentionStore

    try:
        store = AttentionStore.load(path)
    except AttnSegError:
        return None
    if store.meta.get("capture") != signature:
        return None
    owner = signature.get("store")
    if owner:  # the method makes its own store (make_store): it must be able to load it back
        module, _, qual = str(owner).rpartition(".")
        try:
            method_cls = getattr(importlib.import_module(module), qual)
            loader = getattr(method_cls, "load_store", None)
            return loader(path) if loader is not None else None
        except Exception:  # a store that cannot be re-read is captured again
            return None
    return store


def _create_exclusive(path: Path, data: Mapping[str, Any]) -> bool:
    """Write JSON to ``path`` only if it does not exist yet (atomic across processes); True if written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_json_atomic(tmp, data)
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    except OSError:  # no hard links on this file system
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            created = False
        else:
            os.close(fd)
            shutil.copyfile(tmp, path)
            created = True
    finally:
        tmp.unlink(missing_ok=True)
    return created


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    return [f"{prefix.rstrip('.')}: {json.dumps(old)[:60]} -> {json.dumps(new)[:60]}"]


def _read_captions(path: Path, ids: Sequence[str]) -> tuple[dict[str, list[str]], str]:
    if not path.is_file():
        raise ConfigError(f"captions file {path} not found")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"captions file {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()
    ):
        raise ConfigError(f"captions file {path} must map image ids to lists of class names")
    missing = [i for i in ids if i not in data]
    if missing:
        raise ConfigError(f"captions file {path} has no entry for {len(missing)} image(s), e.g. {missing[0]!r}")
    return {i: list(data[i]) for i in ids}, hashlib.sha256(raw).hexdigest()


def evaluate(out: str | Path, **kwargs: Any) -> EvalSummary:
    """Run (or resume) an evaluation; the keyword arguments are those of :class:`EvaluationRun`.

    Example:
        >>> summary = evaluate("runs/a", dataset="generic", root="data/toy", method="diffseg",
        ...                    model="toyworld", limit=4)  # doctest: +SKIP
        >>> summary.report["metrics"]  # doctest: +SKIP
    """
    return EvaluationRun(out, **kwargs).run()
