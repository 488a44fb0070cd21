"""Resumable, shardable evaluation of a segmentation method on a dataset.

A run lives in one folder (``--out RUNDIR``)::

    RUNDIR/config.json               what defines the run (:class:`EvaluationConfig`; written once, a restart
                                     must match it field by field)
    RUNDIR/results-<rank>.jsonl      one line per finished image, appended whole and fsync'ed at once
    RUNDIR/stores/<key>/<id>.safetensors
                                     optional cache of the captured attention (``cache_stores``), one folder
                                     per set of capture settings (:func:`store_key`; ``<key>/capture.json``)
    RUNDIR/report.json, report.md    written when every image is done (or by ``attnseg report``)
    RUNDIR/.lock-<rank>              held while a process writes that shard (:class:`~attnseg.eval.lock.RunLock`)

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
last line is dropped) and skipped. Every file is written atomically (a temporary file and a rename, or a
whole line appended and cut back if the write fails), so a crash or a full disk never leaves a half file
that a resume would trust. Two processes never write one shard at once: the second one stops with
:class:`~attnseg.errors.RunLockedError`; the lock of a killed process is released by the system. Before any
image is evaluated, every pending image's label is checked to have its image's size. Every random draw of
an image is seeded by :func:`image_seed` (run seed + image id), so results do not depend on the order, on
restarts or on the number of processes. Under ``accelerate launch`` / ``torchrun`` each process evaluates
``dataset.shard(rank, world)``; the report merges the integer counts of all files, which gives exactly
the numbers of a single process.

Example:
    >>> config = resolve_evaluation(dataset="generic", root="data/toy", method="diffseg",
    ...                             params={"num_anchors": 4}, model="toyworld", limit=8)  # doctest: +SKIP
    >>> summary = EvaluationRun("runs/ds", config).run()  # doctest: +SKIP
    >>> summary.report["metrics"]["miou"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import numpy as np
from numpy.typing import NDArray

from attnseg.errors import AttnSegError, ConfigError, DatasetError, RunLockedError
from attnseg.eval.lock import RunLock
from attnseg.eval.report import (
    CONFIG_NAME,
    RESULTS_GLOB,
    RUN_FORMAT,
    Scorer,
    append_jsonl,
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
    "EvaluationConfig",
    "EvaluationRun",
    "Geometry",
    "detect_distributed",
    "evaluate",
    "geometry_for",
    "image_seed",
    "method_kind",
    "resolve_evaluation",
    "store_key",
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


# --------------------------------------------------------------------------------------------
# configuration

_CLASS_SOURCES = ("none", "oracle", "vocabulary", "captions")
_IDENTITY_FIELDS = (
    "protocol_id", "dataset", "split", "dataset_options", "num_images", "ids_sha256", "limit", "method",
    "method_kind", "method_params", "model", "dtype", "size", "seed", "geometry", "matching", "class_source",
    "captions_sha256", "background_offset", "skipped_words",
)


def _frozen_json(value: Any) -> Any:
    """A JSON-normalised copy (tuples -> lists, numpy scalars -> numbers), so that a config read back from
    ``config.json`` compares equal to the one that wrote it."""
    return _jsonable(value)


@dataclass(frozen=True)
class EvaluationConfig:
    """What defines an evaluation run: the content of ``RUNDIR/config.json``, validated when constructed.

    The *identity* fields (:data:`_IDENTITY_FIELDS`) decide the numbers of the report: a run folder is resumed only
    with an equal identity, compared field by field (:meth:`differences`). ``protocol``, ``scoring`` and ``ids`` are
    recorded consequences of the identity; the *settings* say where and how the run reads and caches (they may
    differ between restarts). Build one from command-line style options with :func:`resolve_evaluation`; read one
    back with :meth:`from_json`; :class:`EvaluationRun` takes it.

    Attributes:
        protocol_id: ``"name@vN"`` of a registered protocol, or ``"custom@v1"``.
        dataset, split, dataset_options: the reader, its split and options.
        num_images, ids_sha256, limit: how many images, the digest of their ids in order, the ``limit`` asked for.
        method, method_kind, method_params: the method, its kind (:func:`method_kind`) and every hyper-parameter
            (defaults included, ``classes`` excluded: semantic methods get them per image).
        model, dtype, size: model id (a local folder as an absolute path), precision, square input size (None: the
            model's).
        seed: the run seed (:func:`image_seed`).
        geometry: how images, labels and predictions are brought to one size.
        matching, class_source: the scoring protocol and where a semantic method's class names come from.
        captions_sha256, background_offset: the captions file's digest; the fixed background offset.
        skipped_words: class names the model cannot represent, skipped with ``--allow-unknown``.
        protocol, scoring, ids: the protocol record, the scorer's settings, the image ids in order.
        root, device, cache_stores, store_dir, captions, user_params: settings (not compared on resume).
    """

    protocol_id: str
    dataset: str
    split: str | None
    dataset_options: dict[str, Any]
    num_images: int
    ids_sha256: str
    limit: int | None
    method: str
    method_kind: str
    method_params: dict[str, Any]
    model: str
    dtype: str
    size: int | None
    seed: int
    geometry: Geometry
    matching: str
    class_source: str
    captions_sha256: str | None
    background_offset: float | None
    protocol: dict[str, Any]
    scoring: dict[str, Any]
    ids: tuple[str, ...]
    root: str
    skipped_words: tuple[str, ...] = ()
    device: str = "cpu"
    cache_stores: bool = False
    store_dir: str | None = None
    captions: str | None = None
    user_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def fail(message: str) -> NoReturn:
            raise ConfigError(f"evaluation config: {message}")

        for name in ("dataset_options", "method_params", "protocol", "scoring", "user_params"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                fail(f"{name} must be a mapping, got {type(value).__name__}")
            object.__setattr__(self, name, _frozen_json(dict(value)))
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "skipped_words", tuple(str(w) for w in self.skipped_words))
        if isinstance(self.geometry, Mapping):
            g = self.geometry
            object.__setattr__(self, "geometry", Geometry(crop=g["crop"], score_at=g["score_at"],
                                                          upsample=g["upsample"]))
        if not isinstance(self.geometry, Geometry):
            fail(f"geometry must be a Geometry, got {type(self.geometry).__name__}")
        if self.method_kind not in METHOD_KINDS:
            fail(f"method_kind must be one of {', '.join(METHOD_KINDS)}, got {self.method_kind!r}")
        if self.matching not in _KIND_MATCHINGS[self.method_kind]:
            fail(f"a {self.method_kind} method cannot be scored with matching {self.matching!r}; use one of "
                 f"{', '.join(_KIND_MATCHINGS[self.method_kind])}")
        if self.class_source not in _CLASS_SOURCES:
            fail(f"class source must be one of {', '.join(_CLASS_SOURCES)}, got {self.class_source!r}")
        if (self.method_kind == "semantic") == (self.class_source == "none"):
            fail(f"class source {self.class_source!r} does not fit a {self.method_kind} method")
        if (self.class_source == "captions") != (self.captions_sha256 is not None):
            fail("captions_sha256 is recorded exactly when the class source is 'captions'")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            fail(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        for name, value, low in (("seed", self.seed, 0), ("limit", self.limit, 1), ("size", self.size, 1),
                                 ("num_images", self.num_images, 1)):
            if value is None and name in ("limit", "size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                fail(f"{name} must be an integer >= {low}, got {value!r}")
        if self.num_images != len(self.ids) or len(set(self.ids)) != len(self.ids):
            fail(f"ids must be {self.num_images} distinct ids, got {len(self.ids)} ({len(set(self.ids))} distinct)")
        if self.ids_sha256 != _digest(self.ids):
            fail("ids_sha256 does not match the ids")
        if self.background_offset is not None and not math.isfinite(self.background_offset):
            fail(f"background_offset must be finite, got {self.background_offset!r}")
        if self.scoring.get("matching") != self.matching:
            fail(f"scoring matching {self.scoring.get('matching')!r} differs from matching {self.matching!r}")

    # ---- identity --------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """The identity as ``config.json`` holds it (the layout :mod:`attnseg.eval.report` reads)."""
        ident: dict[str, Any] = {
            "protocol": self.protocol_id,
            "dataset": {"name": self.dataset, "split": self.split, "options": self.dataset_options,
                        "num_images": self.num_images, "ids_sha256": self.ids_sha256, "limit": self.limit},
            "method": {"name": self.method, "kind": self.method_kind, "params": self.method_params},
            "model": {"id": self.model, "dtype": self.dtype, "size": self.size},
            "seed": self.seed,
            "geometry": self.geometry.to_dict(),
            "matching": self.matching,
            "class_source": self.class_source,
            "captions_sha256": self.captions_sha256,
            "background_offset": self.background_offset,
        }
        if self.skipped_words:
            ident["skipped_words"] = list(self.skipped_words)
        return _frozen_json(ident)

    def differences(self, other: EvaluationConfig) -> list[str]:
        """``"field: old -> new"`` for every identity field where ``other`` (the old run) differs from this one."""
        out = []
        for name in _IDENTITY_FIELDS:
            old, new = getattr(other, name), getattr(self, name)
            if isinstance(old, Geometry):
                old, new = old.to_dict(), new.to_dict()
            if _frozen_json(old) != _frozen_json(new):
                out.append(f"{name}: {json.dumps(_frozen_json(old))[:60]} -> {json.dumps(_frozen_json(new))[:60]}")
        return out

    # ---- JSON ------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {"root": self.root, "device": self.device, "cache_stores": self.cache_stores,
                "store_dir": self.store_dir, "captions": self.captions, "user_params": self.user_params}

    def to_json(self) -> dict[str, Any]:
        """What ``config.json`` holds (plus the library versions and the creation time)."""
        return {
            "format": RUN_FORMAT,
            "version": _RUN_VERSION,
            "identity": self.identity(),
            "protocol": self.protocol,
            "scoring": self.scoring,
            "settings": self.settings(),
            "ids": list(self.ids),
            "versions": _versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvaluationConfig:
        """Read a config back from ``config.json``'s content (raises :class:`ConfigError` when it does not parse)."""
        try:
            ident = data["identity"]
            ds, meth, model = ident["dataset"], ident["method"], ident["model"]
            settings = data.get("settings") or {}
            geometry = ident["geometry"]
            return cls(
                protocol_id=ident["protocol"], dataset=ds["name"], split=ds["split"],
                dataset_options=ds.get("options") or {}, num_images=ds["num_images"], ids_sha256=ds["ids_sha256"],
                limit=ds.get("limit"), method=meth["name"], method_kind=meth["kind"], method_params=meth["params"],
                model=model["id"], dtype=model["dtype"], size=model.get("size"), seed=ident["seed"],
                geometry=Geometry(crop=geometry["crop"], score_at=geometry["score_at"], upsample=geometry["upsample"]),
                matching=ident["matching"], class_source=ident["class_source"],
                captions_sha256=ident.get("captions_sha256"), background_offset=ident.get("background_offset"),
                skipped_words=tuple(ident.get("skipped_words") or ()), protocol=data["protocol"],
                scoring=data["scoring"], ids=tuple(data["ids"]), root=str(settings.get("root", "")),
                device=str(settings.get("device", "cpu")), cache_stores=bool(settings.get("cache_stores", False)),
                store_dir=settings.get("store_dir"), captions=settings.get("captions"),
                user_params=settings.get("user_params") or {},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"config.json does not describe an evaluation run ({type(exc).__name__}: {exc})"
            ) from None


def _check_option_values(*, root: Any, seed: Any, limit: Any, size: Any, dtype: str, device: str) -> None:
    """The options that need no file, import or model (first, so that a typo fails at once)."""
    from attnseg.models.spec import check_dtype

    if root is None:
        raise ConfigError("the dataset root is required (--root DIR)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"size must be a positive integer, got {size!r}")
    check_dtype(dtype)
    if not isinstance(device, str) or not device.strip():
        raise ConfigError(f"device must be a device name, got {device!r}")


def _resolve_method(method: str, params: Mapping[str, Any] | None) -> tuple[type, MethodKind, dict[str, Any],
                                                                           dict[str, inspect.Parameter]]:
    from attnseg.methods.base import METHODS, list_methods

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
            f"method {method!r} has no parameter {', '.join(unknown)}; its parameters: {', '.join(sorted(accepted))}"
        )
    return method_cls, kind, user_params, accepted


@dataclass(frozen=True)
class _Plan:
    """The protocol's answers (or the ad-hoc ones): dataset, split, options, matching, class source, geometry."""

    protocol: Protocol | None
    dataset: str
    split: str | None
    options: dict[str, Any]
    matching: str
    class_source: str
    geometry: Geometry


def _resolve_protocol(
    protocol: str | None, *, kind: MethodKind, method: str, dataset: str | None, split: str | None,
    dataset_options: Mapping[str, Any] | None, matching: str | None, class_source: str | None, crop: str | None,
    score_at: str | None,
) -> _Plan:
    from attnseg.eval.protocols import get_protocol

    proto = get_protocol(protocol) if protocol else None
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
        plan = _Plan(proto, proto.dataset, proto.split if split is None else split, proto.dataset_kwargs,
                     proto.matching, proto.class_source, geometry)
    else:
        if dataset is None:
            raise ConfigError("give --dataset NAME (with --root DIR) or --protocol NAME")
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
        plan = _Plan(None, dataset, split, dict(dataset_options or {}), matching, class_source, geometry)
    if kind == "semantic" and plan.class_source == "none":
        raise ConfigError(f"{method!r} is a semantic method and needs class names (--class-source)")
    if plan.class_source not in _CLASS_SOURCES:
        raise ConfigError(f"class source must be oracle, vocabulary or captions, got {plan.class_source!r}")
    return plan


def _open_dataset(plan: _Plan, root: str | Path, limit: int | None) -> SegmentationDataset:
    from attnseg.eval.datasets import create_dataset

    ds = create_dataset(plan.dataset, root, plan.split, **plan.options)
    if limit is not None:
        ds = ds.take(limit)
    if len(ds) == 0:
        raise DatasetError(f"{plan.dataset}: no images to evaluate")
    if not ds.class_names:
        raise DatasetError(
            f"{plan.dataset} at {ds.root} has no class names: add classes.txt (one name per line) or pass "
            "--dataset-option num_classes=N"
        )
    if plan.protocol is not None and plan.protocol.num_classes != ds.num_classes:
        raise DatasetError(
            f"protocol {plan.protocol.name!r} scores {plan.protocol.num_classes} classes but {plan.dataset} at "
            f"{ds.root} has {ds.num_classes}"
        )
    if len(set(ds.ids)) != len(ds.ids):
        raise DatasetError(f"{plan.dataset}: image ids are not unique")
    return ds


def _background_id(class_names: Sequence[str]) -> int | None:
    lowered = [n.lower() for n in class_names]
    return next((lowered.index(n) for n in _BACKGROUND_NAMES if n in lowered), None)


def _positive_class(class_names: Sequence[str], target: Any, dataset: str) -> int:
    lowered = {n.lower(): i for i, n in enumerate(class_names)}
    if isinstance(target, str) and target.lower() in lowered:
        return lowered[target.lower()]
    if len(class_names) == 2:
        return 1
    raise ConfigError(
        f"cannot tell which class of {dataset} is the target {target!r}; classes: {', '.join(class_names)}"
    )


def _check_words(
    tokenizer: Any, *, kind: MethodKind, names: Sequence[str], target: str | None, allow_unknown: bool
) -> tuple[str, ...]:
    """Class names (semantic) or the target (binary) the model's vocabulary cannot represent: an error, or with
    ``allow_unknown`` the class names to skip."""
    from attnseg.prompts import unknown_words

    if kind == "binary" and target:
        bad = unknown_words(tokenizer, [target])
        if bad:
            raise ConfigError(f"the model's vocabulary cannot represent the target {target!r}; give a target word "
                              "the model knows (-P target=WORD)")
        return ()
    if kind != "semantic" or not names:
        return ()
    bad = unknown_words(tokenizer, names)
    if bad and not allow_unknown:
        listed = ", ".join(repr(n) for n in bad)
        raise ConfigError(f"the model's vocabulary cannot represent the class name(s) {listed}: their segments would "
                          "be guesswork; use a model that knows them, or pass --allow-unknown to skip them (never "
                          "predicted)")
    return tuple(bad)


def resolve_evaluation(
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
    allow_unknown: bool = False,
    adapter: DiffusionAdapter | None = None,
) -> EvaluationConfig:
    """Check command-line style options and resolve them into an :class:`EvaluationConfig`.

    Everything is checked that needs no model weights: the option values, the method and its hyper-parameters, the
    protocol, the dataset's layout, the class source, the model's configuration files (input size, timestep) and
    the words against its tokenizer. Nothing is written. The keyword arguments are those of :class:`EvaluationRun`.
    """
    _check_option_values(root=root, seed=seed, limit=limit, size=size, dtype=dtype, device=device)
    _, kind, user_params, accepted = _resolve_method(method, params)
    plan = _resolve_protocol(protocol, kind=kind, method=method, dataset=dataset, split=split,
                             dataset_options=dataset_options, matching=matching, class_source=class_source, crop=crop,
                             score_at=score_at)
    proto = plan.protocol
    assert root is not None
    ds = _open_dataset(plan, root, limit)
    ids = tuple(ds.ids)
    background_id = _background_id(ds.class_names)

    captions_map: dict[str, list[str]] | None = None
    captions_digest = None
    if plan.class_source == "captions":
        if captions is None:
            raise ConfigError("class source 'captions' needs --captions FILE (JSON: image id -> list of names)")
        captions_map, captions_digest = _read_captions(Path(captions), ids)
    elif captions is not None:
        raise ConfigError("--captions is only used with --class-source captions")

    background, offsets, select = _background_plan(proto, plan.matching, plan.split, background_offset)
    if offsets is not None and background_id is None:
        raise ConfigError(f"{plan.dataset} has no 'background' class, so a background offset cannot be applied")

    # method parameters: validated by constructing the method, recorded with their defaults
    from attnseg.methods.base import create_method

    probe = dict(user_params)
    if kind == "semantic":
        probe["classes"] = [n for i, n in enumerate(ds.class_names) if i != background_id][:1] or ["object"]
    try:
        probe_method = create_method(method, **probe)
    except TypeError as exc:  # e.g. a required hyper-parameter (target=...) is missing
        raise ConfigError(f"method {method!r}: {exc}") from None
    full = {n: p.default for n, p in accepted.items() if p.default is not inspect.Parameter.empty}
    full.update(user_params)
    full.pop("classes", None)
    positive = _positive_class(ds.class_names, user_params.get("target"), ds.name) if plan.matching == "binary" \
        else None

    # the model, from its configuration files (no weights): input size, timestep, words
    if model is None:
        model = (getattr(adapter, "name", "") or type(adapter).__name__) if adapter is not None else "toyworld"
    model_id = str(Path(model).resolve()) if Path(model).exists() else model
    run_size = size or (proto.resolution if proto is not None else None)
    if adapter is None:
        from attnseg.models.spec import check_device, describe_model

        spec = describe_model(model)
        if run_size is not None:
            spec.check_size(run_size, flag="--size" if size else f"protocol {proto.name if proto else ''} size")
        spec.check_timestep(probe_method.run_options().timestep, flag=f"{method}'s timestep (-P timestep=...)")
        load_tokenizer: Callable[[], Any] = spec.tokenizer
        check_device(device)
    else:
        def load_tokenizer() -> Any:
            return getattr(adapter, "tokenizer", None)
    if kind == "semantic":
        if captions_map is not None:
            names = sorted({n for v in captions_map.values() for n in v})
        else:
            names = [n for i, n in enumerate(ds.class_names) if i != background_id]
        target = None
    else:
        names, target = [], getattr(probe_method, "target", None)
    skipped: tuple[str, ...] = ()
    if (names or target) and (tokenizer := load_tokenizer()) is not None:
        skipped = _check_words(tokenizer, kind=kind, names=names, target=target, allow_unknown=allow_unknown)

    if proto is not None:
        protocol_dict = proto.to_dict()
    else:
        from attnseg.eval.protocols import Protocol

        metrics = {"semantic": ("miou", "miou_absent_as_zero", "pixel_accuracy"),
                   "binary": ("miou", "accuracy", "precision", "f1", "iou", "recall"),
                   "best-match": ("best_match_iou",)}.get(plan.matching, ("miou", "pixel_accuracy"))
        protocol_dict = Protocol(
            name="custom", version=1, dataset=plan.dataset, split=str(ds.split),
            preprocessing=plan.geometry.describe(), resolution=run_size, matching=plan.matching,
            background=background, class_source=plan.class_source, num_classes=ds.num_classes, metrics=metrics,
            notes="Ad-hoc evaluation (no registered protocol).", source="attnseg evaluate",
            dataset_options=tuple(plan.options.items()),
        ).to_dict()
    scoring = {
        "matching": plan.matching, "num_classes": ds.num_classes, "ignore_index": ds.ignore_index,
        "class_names": list(ds.class_names), "offsets": offsets, "select": select,
        "primary": protocol_dict["metrics"][0] if protocol_dict["metrics"] else "miou", "positive": positive,
    }
    make_scorer(scoring)  # the scorer's own checks
    use_cache = bool(cache_stores or store_dir is not None)
    return EvaluationConfig(
        protocol_id=protocol_dict["id"], dataset=plan.dataset, split=ds.split, dataset_options=plan.options,
        num_images=len(ids), ids_sha256=_digest(ids), limit=limit, method=method, method_kind=kind,
        method_params=full, model=model_id, dtype=dtype, size=run_size, seed=seed, geometry=plan.geometry,
        matching=plan.matching, class_source=plan.class_source, captions_sha256=captions_digest,
        background_offset=background_offset, protocol=protocol_dict, scoring=scoring, ids=ids,
        root=str(Path(root).resolve()), skipped_words=skipped, device=device, cache_stores=use_cache,
        store_dir=str(Path(store_dir).resolve()) if store_dir is not None else None,
        captions=str(Path(captions).resolve()) if captions is not None else None, user_params=user_params,
    )


class EvaluationRun:
    """One evaluation in one run folder: takes an :class:`EvaluationConfig` and does the work.

    Construction never touches ``out``; :meth:`prepare` locks this process's shard of the folder, writes or checks
    ``config.json`` and checks the pending images; :meth:`run` loads the model and evaluates the images this process
    still has to do.

    Args:
        out: the run folder (``RUNDIR``).
        config: the run's configuration; without it, ``**options`` are resolved with :func:`resolve_evaluation`
            (its keyword arguments: ``dataset``, ``root``, ``protocol``, ``method``, ``params``, ``model``, ``split``,
            ``dataset_options``, ``limit``, ``seed``, ``class_source``, ``captions``, ``matching``,
            ``background_offset``, ``size``, ``crop``, ``score_at``, ``dtype``, ``device``, ``cache_stores``,
            ``store_dir``, ``allow_unknown``).
        overwrite: discard the results of a previous run in ``out`` (cached stores are kept).
        rank, world_size: this process's shard (default: :func:`detect_distributed`).
        adapter: an already loaded model adapter (``model`` is then only recorded).

    Attention stores are cached (``cache_stores``) under ``store_dir/<key>/<image id>.safetensors``, where ``key``
    is a digest of the capture settings (model, input size, prompt, timestep, layers...): runs with other methods or
    settings never overwrite each other's stores, and ``store_dir`` may point at another run's stores.
    """

    def __init__(
        self,
        out: str | Path,
        config: EvaluationConfig | None = None,
        *,
        overwrite: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        adapter: DiffusionAdapter | None = None,
        **options: Any,
    ) -> None:
        from attnseg.methods.base import create_method

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
        if config is None:
            config = resolve_evaluation(adapter=adapter, **options)
        elif options:
            raise ConfigError(f"give a config or options, not both (got {', '.join(sorted(options))})")
        self.evaluation_config = config
        self.overwrite = overwrite
        self.adapter = adapter

        # everything below is rebuilt from the config (cheap: file lists, no images, no model)
        from attnseg.eval.datasets import create_dataset
        from attnseg.eval.protocols import get_protocol

        self.protocol_obj = get_protocol(config.protocol_id) if not config.protocol_id.startswith("custom@") else None
        self.kind: MethodKind = config.method_kind  # type: ignore[assignment]
        self.geometry = config.geometry
        self.class_source = config.class_source
        ds = create_dataset(config.dataset, config.root, config.split, **config.dataset_options)
        if config.limit is not None:
            ds = ds.take(config.limit)
        if _digest(ds.ids) != config.ids_sha256:
            raise DatasetError(f"{config.dataset} at {config.root} no longer lists the images of this configuration")
        self.dataset: SegmentationDataset = ds
        self.ids: list[str] = list(config.ids)
        self._names = {n.lower(): i for i, n in enumerate(ds.class_names)}
        self.background_id = _background_id(ds.class_names)
        self.skipped = {w.lower() for w in config.skipped_words}
        self.captions: dict[str, list[str]] | None = None
        if config.class_source == "captions":
            assert config.captions is not None
            self.captions, digest = _read_captions(Path(config.captions), self.ids)
            if digest != config.captions_sha256:
                raise ConfigError(f"captions file {config.captions} changed since the configuration was made")
        self.offsets: list[float] | None = config.scoring.get("offsets")
        self.method_name = config.method
        self.user_params = dict(config.user_params)
        probe = dict(self.user_params)
        if self.kind == "semantic":
            probe["classes"] = [n for i, n in enumerate(ds.class_names) if i != self.background_id][:1] or ["object"]
        self._method = create_method(config.method, **probe)
        self.method_params = config.method_params
        self.model_id = config.model
        self.dtype = config.dtype
        self.device = _resolve_device(config.device, self.world_size)
        self.size = config.size
        self.seed = config.seed
        self.cache_stores = config.cache_stores
        self.store_dir = Path(config.store_dir) if config.store_dir is not None else self.out / "stores"
        self.protocol = config.protocol
        self.scoring = config.scoring
        self.scorer: Scorer = make_scorer(self.scoring)
        self.matching = config.matching
        self.identity = config.identity()
        self._lock: RunLock | None = None
        self._prepared = False
        self.pending: list[int] = []
        self.done_before = 0
        self.shard: list[int] = list(range(self.rank, len(self.ids), self.world_size))

    @property
    def config(self) -> dict[str, Any]:
        """What ``config.json`` holds (see :meth:`EvaluationConfig.to_json`)."""
        data = self.evaluation_config.to_json()
        data["settings"]["store_dir"] = str(self.store_dir.resolve()) if self.cache_stores else None
        data["settings"]["world_size"] = self.world_size
        return data

    # ---- run folder --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Lock this shard of ``out``, write ``config.json`` (or check that the existing one describes this run),
        find the images of this shard that are not finished yet and check their label sizes.

        The lock is held until :meth:`run` returns (or :meth:`close`); a second process on the same shard gets
        :class:`~attnseg.errors.RunLockedError`.
        """
        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file, not a folder")
        fresh = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = RunLock(out, self.rank).acquire()
        except RunLockedError:
            raise
        except OSError as exc:
            raise ConfigError(f"cannot write the run folder {out}: {exc.strerror or exc}") from None
        try:
            self._prepare_locked()
        except BaseException:
            self.close()
            if fresh:  # nothing of this run was kept: leave no empty folder behind
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
        self._prepared = True

    def _prepare_locked(self) -> None:
        out = self.out
        config_path = out / CONFIG_NAME
        has_config = config_path.exists()
        if has_config and not self.overwrite:
            self._check_config(read_config(out))
        elif not has_config and not self.overwrite and any(out.glob(RESULTS_GLOB)):
            raise ConfigError(f"{out} holds result files but no {CONFIG_NAME}; use --overwrite or a new --out folder")
        finished = read_results(out, ids=self.ids).ids if has_config and not self.overwrite else set()
        pending = [i for i in self.shard if self.ids[i] not in finished]
        self._check_label_sizes(pending)  # before anything is written or deleted
        if self.overwrite:
            for path in [*out.glob(RESULTS_GLOB), out / "report.json", out / "report.md", config_path]:
                path.unlink(missing_ok=True)
        if not _create_exclusive(config_path, self.config):
            self._check_config(read_config(out))
        own = out / f"results-{self.rank}.jsonl"
        if own.exists():
            read_jsonl(own, repair=True)  # drop a torn last line before appending
        finished = read_results(out, ids=self.ids).ids
        self.pending = [i for i in self.shard if self.ids[i] not in finished]
        self.done_before = len(self.shard) - len(self.pending)

    def _check_label_sizes(self, indices: Sequence[int]) -> None:
        """Every pending image's label must have the image's size (read from the file headers, no decoding)."""
        for index in indices:
            image_size, label_size = self.dataset.file_sizes(index)
            if image_size != label_size:
                raise DatasetError(
                    f"{self.dataset.name}: the label of {self.ids[index]!r} is {label_size[0]}x{label_size[1]} px but "
                    f"its image is {image_size[0]}x{image_size[1]} px; fix or remove that pair (labels are never "
                    "cropped or stretched to fit)"
                )

    def close(self) -> None:
        """Release the lock on this shard (also done when :meth:`run` returns)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_config(self, existing: Mapping[str, Any]) -> None:
        try:
            old = EvaluationConfig.from_json(existing)
        except ConfigError:
            old = None
        if old is not None:
            diffs = self.evaluation_config.differences(old)
        else:  # a config this version cannot parse: compare the recorded identity as it is
            diffs = _diff(existing.get("identity", {}), _jsonable(self.identity))
        if not diffs:
            return
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
        try:
            if self.pending:
                adapter = self._load_adapter()
                pipe = AttentionSegmentationPipeline(adapter, self._method)
                if on_start is not None:
                    on_start(summary)
                path = self.out / f"results-{self.rank}.jsonl"
                for index in self.pending:
                    record = self._evaluate_one(pipe, index)
                    append_jsonl(path, record)
                    summary.done_now += 1
                    summary.stores[record["store"]] = summary.stores.get(record["store"], 0) + 1
                    if on_image is not None:
                        on_image(record)
            elif on_start is not None:
                on_start(summary)
        finally:
            self.close()
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
        if tuple(label.shape) != (image.height, image.width):
            raise DatasetError(
                f"{self.dataset.name}: the label of {sample.id!r} is {label.shape[1]}x{label.shape[0]} px but its "
                f"image is {image.width}x{image.height} px; fix or remove that pair (labels are never cropped or "
                "stretched to fit)"
            )
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
        prompts = 1
        if self.kind == "semantic" and not classes:
            result = None  # nothing to look for: every pixel is background
            t2 = t3 = time.perf_counter()
        else:
            if self.kind == "semantic":
                from attnseg.methods.base import create_method

                pipe.method = create_method(self.method_name, **self.user_params, classes=classes)
            parts = pipe.prompt_parts()  # classes beyond one prompt's token limit: one capture per prompt
            prompts = len(parts)
            if prompts == 1:
                store, store_state = self._store(pipe, image, sample.id, seed, size)
                t2 = time.perf_counter()
                result = pipe.segment_store(store)
            else:
                results, states = [], []
                t2 = 0.0
                for part in parts:
                    sub = pipe.with_method(part)
                    store, state = self._store(sub, image, sample.id, seed, size)
                    t2 -= time.perf_counter()
                    results.append(sub.segment_store(store))
                    t2 += time.perf_counter()
                    states.append(state)
                result = pipe.method.combine_parts(results)  # type: ignore[attr-defined]
                store_state = states[0] if len(set(states)) == 1 else "mixed"
                t2 = time.perf_counter() - t2  # the segmenting time is not capture time
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
        if prompts > 1:
            record["prompts"] = prompts
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
            chosen = [names[int(c)] for c in present if 0 <= c < len(names) and c != self.background_id]
        elif self.class_source == "vocabulary":
            chosen = [n for i, n in enumerate(names) if i != self.background_id]
        else:
            assert self.captions is not None
            chosen = list(self.captions[image_id])
        return [n for n in chosen if n.lower() not in self.skipped]  # --allow-unknown: never predicted

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
        """The image's attention store: loaded from the cache when its capture settings match, else captured.

        The cache folder is keyed by the capture settings (:func:`store_key`), so that another method or setting
        never replaces these stores; a damaged cached file is captured again.
        """
        if not self.cache_stores:
            store, _ = pipe.capture(image, seed=seed, size=size)
            return store, "computed"
        signature = self._capture_signature(pipe, seed, size)
        folder = self.store_dir / store_key(signature, run_seed=self.seed)
        path = folder / f"{_safe_name(image_id)}.safetensors"
        if path.is_file():
            store = _load_store(path, signature)
            if store is not None:
                return store, "loaded"
        store, _ = pipe.capture(image, seed=seed, size=size)
        store.meta["capture"] = signature
        store.meta["image_id"] = image_id
        folder.mkdir(parents=True, exist_ok=True)
        described = folder / "capture.json"
        if not described.exists():
            write_json_atomic(described, {**{k: v for k, v in signature.items() if k != "seed"},
                                          "run_seed": self.seed})
        store.save(path)  # atomic: a temporary file, then a rename
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


def store_key(signature: Mapping[str, Any], *, run_seed: int) -> str:
    """The cache sub-folder of stores captured with ``signature`` (every capture setting except the image's own
    seed, which derives from ``run_seed`` and the image id): 16 hex digits of a SHA-256."""
    settings = {k: v for k, v in signature.items() if k != "seed"}
    if signature.get("seed") is not None:  # random captures: the run seed decides every image's draws
        settings["run_seed"] = int(run_seed)
    text = json.dumps(_jsonable(settings), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    """Run (or resume) an evaluation; the keyword arguments are those of :class:`EvaluationRun` (and of
    :func:`resolve_evaluation`).

    Example:
        >>> summary = evaluate("runs/a", dataset="generic", root="data/toy", method="diffseg",
        ...                    model="toyworld", limit=4)  # doctest: +SKIP
        >>> summary.report["metrics"]  # doctest: +SKIP
    """
    return EvaluationRun(out, **kwargs).run()
