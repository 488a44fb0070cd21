"""Writing results: label PNGs, colour overlays with a legend, per-segment JSON, heatmaps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from attnseg.types import SegmentationResult

__all__ = ["colorize", "label_image", "overlay", "palette", "save_heatmap", "save_result", "segment_summary"]


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


def label_image(labels: np.ndarray) -> Image.Image:
    """``(H, W)`` non-negative int ids -> a grayscale PNG-ready image: 8-bit while every id is below 256, 16-bit up
    to 65535 (so ids never wrap), refused above."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"label ids must lie in [0, 65535] to be written as a PNG, got {labels.min()}..{labels.max()}")
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    return Image.fromarray(np.ascontiguousarray(labels.astype(dtype)))


def colorize(labels: np.ndarray) -> Image.Image:
    """``(H, W)`` int labels -> RGB image, one colour per id."""
    labels = np.asarray(labels)
    n = int(labels.max()) + 1 if labels.size else 1
    return Image.fromarray(palette(n)[labels])


def overlay(
    image: Image.Image, labels: np.ndarray, *, alpha: float = 0.5, names: tuple[str, ...] | None = None
) -> Image.Image:
    """Blend the colourised labels over ``image`` (resized to the labels' size); with ``names`` a legend
    of the ids present is drawn in the corner."""
    labels = np.asarray(labels)
    base = image.convert("RGB").resize((labels.shape[1], labels.shape[0]), Image.Resampling.BILINEAR)
    blended = Image.blend(base, colorize(labels), alpha)
    if names:
        draw = ImageDraw.Draw(blended)
        cols = palette(len(names))
        y = 2
        for i in np.unique(labels).tolist():
            if i < len(names):
                draw.rectangle((2, y, 12, y + 10), fill=tuple(int(c) for c in cols[i]), outline=(0, 0, 0))
                draw.text((16, y - 1), str(names[i]), fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
                y += 14
    return blended


def segment_summary(result: SegmentationResult) -> dict[str, Any]:
    """Per-segment id, name, area (pixels, fraction) and bounding box ``[x0, y0, x1, y1]`` (inclusive)."""
    labels = result.labels.cpu().numpy()
    h, w = labels.shape
    segments = []
    for i in np.unique(labels).tolist():
        ys, xs = np.nonzero(labels == i)
        seg: dict[str, Any] = {
            "id": int(i),
            "area": int(ys.size),
            "fraction": round(ys.size / (h * w), 6),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
        }
        if result.label_names is not None and i < len(result.label_names):
            seg["name"] = result.label_names[i]
        segments.append(seg)
    return {
        "method": result.method,
        "size": [h, w],
        "num_segments": len(segments),
        "segments": segments,
        "params": _jsonable(result.params),
        "meta": _jsonable(result.meta),
    }


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


def save_heatmap(scores: np.ndarray, path: str | Path) -> Path:
    """Write an ``(H, W)`` float map as a colour PNG (min-max scaled, blue -> red)."""
    s = np.asarray(scores, dtype=np.float64)
    s = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.zeros_like(s)
    rgb = np.stack([s, 1 - np.abs(2 * s - 1), 1 - s], axis=-1)
    path = Path(path)
    Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(path)
    return path


def save_result(
    result: SegmentationResult, out_dir: str | Path, *, image: Image.Image | None = None, stem: str = "image"
) -> dict[str, Path]:
    """Write ``<stem>.labels.png`` (ids as 8- or 16-bit gray), ``<stem>.json`` and, with ``image``,
    ``<stem>.overlay.png``. Returns the paths written, by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = result.labels.cpu().numpy()
    paths = {"labels": out / f"{stem}.labels.png", "json": out / f"{stem}.json"}
    label_image(labels).save(paths["labels"])
    paths["json"].write_text(json.dumps(segment_summary(result), indent=2))
    if image is not None:
        paths["overlay"] = out / f"{stem}.overlay.png"
        overlay(image, labels, names=result.label_names).save(paths["overlay"])
    return paths
