"""Writing results: label PNGs, colour overlays with a legend, per-segment JSON, heatmaps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from attnseg.io.atomic import write_text_atomic

if TYPE_CHECKING:
    from attnseg.io.geometry import Placement
    from attnseg.types import SegmentationResult

__all__ = [
    "colorize",
    "heatmap_image",
    "label_image",
    "label_png_array",
    "overlay",
    "palette",
    "save_heatmap",
    "save_result",
    "segment_summary",
    "summarize_labels",
    "write_json",
]


def palette(n: int) -> np.ndarray:
    """``(n, 3) uint8`` distinct colours (the Pascal VOC bit-interleaving palette, without black first)."""
    cols = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i + 1, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cols[i] = (r, g, b)
    return cols


def label_png_array(labels: np.ndarray) -> np.ndarray:
    """Non-negative int ids as an array a PNG can hold: 8-bit while every id is below 256, else 16-bit (up to
    65535, so ids never wrap); ids outside ``[0, 65535]`` are refused."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"label ids must lie in [0, 65535] to be written as a PNG, got {labels.min()}..{labels.max()}")
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16, copy=False)


def label_image(labels: np.ndarray) -> Image.Image:
    """``(H, W)`` non-negative int ids -> a grayscale PNG-ready image, 8- or 16-bit (see :func:`label_png_array`)."""
    return Image.fromarray(np.ascontiguousarray(label_png_array(labels)))


def colorize(labels: np.ndarray) -> Image.Image:
    """``(H, W)`` int labels -> RGB image, one colour per id."""
    labels = np.asarray(labels)
    n = int(labels.max()) + 1 if labels.size else 1
    return Image.fromarray(palette(n)[labels])


def _legend_font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def overlay(
    image: Image.Image, labels: np.ndarray, *, alpha: float = 0.5, names: tuple[str, ...] | None = None
) -> Image.Image:
    """Blend the colourised labels over ``image`` (resized to the labels' size); with ``names`` a legend
    of the ids present is drawn in the corner, scaled with the picture."""
    labels = np.asarray(labels)
    h, w = labels.shape
    base = image.convert("RGB")
    if base.size != (w, h):
        base = base.resize((w, h), Image.Resampling.BILINEAR)
    blended = Image.blend(base, colorize(labels), alpha)
    del base
    if names:
        draw = ImageDraw.Draw(blended)
        cols = palette(len(names))
        box = max(10, min(h, w) // 40)
        font = _legend_font(box)
        y = 2
        for i in np.unique(labels).tolist():
            if i < len(names):
                draw.rectangle((2, y, 2 + box, y + box), fill=tuple(int(c) for c in cols[i]), outline=(0, 0, 0))
                draw.text((6 + box, y - 1), str(names[i]), fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0),
                          font=font)
                y += box + 4
    return blended


def summarize_labels(
    labels: np.ndarray, *, method: str = "", label_names: tuple[str, ...] | None = None,
    params: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON summary of an ``(H, W)`` id map: per segment id, name, area (pixels, fraction) and bounding box
    ``[x0, y0, x1, y1]`` (inclusive); ``meta["geometry"]``, when present, is lifted to the top level (fit,
    model input size, boxes). Memory: one boolean map at a time."""
    labels = np.asarray(labels)
    h, w = labels.shape
    meta = dict(meta or {})
    geometry = meta.pop("geometry", None)
    counts = np.bincount(labels.ravel().astype(np.int64)) if labels.size else np.zeros(0, np.int64)
    segments = []
    for i in np.flatnonzero(counts).tolist():
        mask = labels == i
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        del mask
        seg: dict[str, Any] = {
            "id": int(i),
            "area": int(counts[i]),
            "fraction": round(int(counts[i]) / (h * w), 6),
            "bbox": [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])],
        }
        if label_names is not None and i < len(label_names):
            seg["name"] = label_names[i]
        segments.append(seg)
    out: dict[str, Any] = {"method": method, "size": [h, w]}
    if geometry is not None:
        out["geometry"] = _jsonable(geometry)
    out.update({"num_segments": len(segments), "segments": segments, "params": _jsonable(params or {}),
                "meta": _jsonable(meta)})
    return out


def segment_summary(result: SegmentationResult) -> dict[str, Any]:
    """Per-segment id, name, area (pixels, fraction) and bounding box ``[x0, y0, x1, y1]`` (inclusive), at the
    result's size (see :func:`summarize_labels`)."""
    return summarize_labels(result.labels.cpu().numpy(), method=result.method, label_names=result.label_names,
                            params=result.params, meta=result.meta)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def heatmap_image(scores: Any) -> Image.Image:
    """An ``(H, W)`` float map as a colour image (min-max scaled, blue -> red); float32, a band at a time."""
    s = np.asarray(scores, dtype=np.float32)
    lo, hi = (float(s.min()), float(s.max())) if s.size else (0.0, 0.0)
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    rgb = np.empty((*s.shape, 3), np.uint8)
    rows = max(1, (1 << 20) // max(1, s.shape[1]))
    for r in range(0, s.shape[0], rows):
        band = (s[r : r + rows] - lo) * scale
        rgb[r : r + rows, :, 0] = (band * 255 + 0.5).astype(np.uint8)
        rgb[r : r + rows, :, 1] = ((1 - np.abs(2 * band - 1)) * 255 + 0.5).astype(np.uint8)
        rgb[r : r + rows, :, 2] = ((1 - band) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(rgb)


def save_heatmap(scores: np.ndarray, path: str | Path) -> Path:
    """Write an ``(H, W)`` float map as a colour PNG (min-max scaled, blue -> red)."""
    path = Path(path)
    heatmap_image(scores).save(path)
    return path


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write JSON atomically (see :mod:`attnseg.io.atomic`): a JSON that exists is complete."""
    return write_text_atomic(path, json.dumps(data, indent=2))


def save_result(
    result: SegmentationResult, out_dir: str | Path, *, image: Image.Image | None = None, stem: str = "image",
    placement: Placement | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.labels.png`` (ids as 8- or 16-bit gray), ``<stem>.json`` and, with ``image``,
    ``<stem>.overlay.png``. Returns the paths written, by kind.

    With ``placement`` and a result at the model input size, everything is written at the original image's
    size (labels nearest; ``image`` may be the original or a reduced copy) and the JSON records the geometry.
    The JSON is written last and atomically, so its presence marks a finished image.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(result.meta)
    if placement is not None and result.size == placement.model:
        labels = placement.labels_to_original(result.labels)
        meta["geometry"] = placement.to_dict()
    else:
        labels = result.labels.cpu().numpy()
    paths = {"labels": out / f"{stem}.labels.png", "json": out / f"{stem}.json"}
    label_image(labels).save(paths["labels"])
    if image is not None:
        paths["overlay"] = out / f"{stem}.overlay.png"
        overlay(image, labels, names=result.label_names).save(paths["overlay"])
    summary = summarize_labels(labels, method=result.method, label_names=result.label_names, params=result.params,
                               meta=meta)
    write_json(summary, paths["json"])
    return paths
