"""Where an image lands in the model's input, and how maps come back to the image's own pixels.

A :class:`Placement` says which box of the original image the model sees (``source``) and which box of
the model input holds it (``target``); everything between the two is one axis-aligned scale per side.

Fits (``Fit``):

- ``"pad"`` (the default: loses nothing, works with every model): the whole image, aspect ratio kept,
  centred in the model input; the rest of the input is mid-grey padding, and maps are cut back to the
  image's box, so no segment ever covers padding.
- ``"resize"``: the whole image squashed to the model input (aspect ratio not kept).
- ``"crop"``: the largest centred box with the model input's aspect ratio (what DiffSeg's protocol does);
  the rest of the image is not seen and gets the nearest edge's labels back.
- ``"native"``: an input of about the model's resolution in area with the image's aspect ratio, each side
  rounded to the model's size multiple (latent cell times the denoiser's downsampling); the whole image
  is resized to it. Only for models that accept any aspect ratio (``adapter.size_multiple``) and methods
  that accept non-square attention grids.

Coordinates are continuous pixel-edge coordinates ``(x, y)``: pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``.
Boxes are ``(x0, y0, x1, y1)`` integer pixel edges, half-open. Sizes are ``(H, W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from attnseg.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from attnseg.types import SegmentationResult

__all__ = ["DEFAULT_FIT", "FITS", "PAD_VALUE", "Box", "Fit", "Placement", "native_size", "place"]

Fit = Literal["pad", "resize", "crop", "native"]
FITS: tuple[str, ...] = get_args(Fit)
DEFAULT_FIT: Fit = "pad"
#: grey of the letterbox padding (0 in the model's [-1, 1] pixel range, up to 1/255)
PAD_VALUE = (128, 128, 128)

Box = tuple[int, int, int, int]


def _size(value: Any, what: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be (H, W), got {value!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"{what} must be positive, got {(h, w)}")
    return h, w


def check_fit(fit: str) -> Fit:
    """``fit`` if it is one of :data:`FITS`, else a :class:`ConfigError` naming the choices."""
    if fit not in FITS:
        raise ConfigError(f"fit must be one of {', '.join(FITS)}; got {fit!r}")
    return fit  # type: ignore[return-value]


def native_size(original: tuple[int, int], resolution: tuple[int, int], multiple: int) -> tuple[int, int]:
    """``(H, W)`` with the aspect ratio of ``original`` and about the area of ``resolution``, each side a
    multiple of ``multiple`` (rounded to the nearest, at least one multiple).

    When a side is clamped to one multiple (a very wide or tall image), the other is shortened so the area
    stays within 1.5x the resolution's: the aspect ratio then gives way, never the memory.

    Example:
        >>> native_size((300, 2000), (512, 512), 64)
        (192, 1344)
    """
    h0, w0 = _size(original, "original size")
    rh, rw = _size(resolution, "resolution")
    if multiple < 1:
        raise ConfigError(f"multiple must be >= 1, got {multiple}")
    area = rh * rw
    aspect = w0 / h0

    def snap(v: float) -> int:
        return max(multiple, round(v / multiple) * multiple)

    h, w = snap(math.sqrt(area / aspect)), snap(math.sqrt(area * aspect))
    if h * w > 1.5 * area:
        if h <= w:
            w = max(multiple, (area // h) // multiple * multiple)
        else:
            h = max(multiple, (area // w) // multiple * multiple)
    return h, w


@dataclass(frozen=True)
class Placement:
    """The geometry between an image and the model input (see the module docstring).

    Attributes:
        original: ``(H, W)`` of the image as given (after EXIF orientation).
        model: ``(H, W)`` of the model input.
        fit: how it was placed (``"pad"``, ``"resize"``, ``"crop"`` or ``"native"``).
        source: ``(x0, y0, x1, y1)`` box of the original that the model sees (all of it unless ``crop``).
        target: ``(x0, y0, x1, y1)`` box of the model input that holds it (all of it unless ``pad``).
    """

    original: tuple[int, int]
    model: tuple[int, int]
    fit: Fit
    source: Box
    target: Box

    def __post_init__(self) -> None:
        check_fit(self.fit)
        for name, box, (h, w) in (("source", self.source, self.original), ("target", self.target, self.model)):
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise ConfigError(f"{name} box {box} is empty or outside {w}x{h}")

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, original: tuple[int, int], model: tuple[int, int], fit: Fit) -> Placement:
        """Place an ``original``-sized image in a ``model``-sized input.

        For ``"native"`` pass the native size (:func:`native_size`) as ``model``; the image is then resized
        to it as with ``"resize"``. Rounding: box sides are rounded to the nearest pixel, offsets floor-centred.

        Example:
            >>> Placement.create((300, 2000), (512, 512), "pad").target
            (0, 217, 512, 294)
            >>> Placement.create((300, 2000), (512, 512), "crop").source
            (850, 0, 1150, 300)
        """
        fit = check_fit(fit)
        oh, ow = _size(original, "original size")
        mh, mw = _size(model, "model size")
        full_source, full_target = (0, 0, ow, oh), (0, 0, mw, mh)
        if fit == "crop":
            scale = max(mw / ow, mh / oh)
            cw, ch = min(ow, max(1, round(mw / scale))), min(oh, max(1, round(mh / scale)))
            left, top = (ow - cw) // 2, (oh - ch) // 2
            return cls((oh, ow), (mh, mw), fit, (left, top, left + cw, top + ch), full_target)
        if fit == "pad":
            scale = min(mw / ow, mh / oh)
            cw, ch = min(mw, max(1, round(ow * scale))), min(mh, max(1, round(oh * scale)))
            left, top = (mw - cw) // 2, (mh - ch) // 2
            return cls((oh, ow), (mh, mw), fit, full_source, (left, top, left + cw, top + ch))
        return cls((oh, ow), (mh, mw), fit, full_source, full_target)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Placement:
        return cls(
            original=_size(d["original_size"], "original_size"), model=_size(d["model_size"], "model_size"),
            fit=d["fit"], source=tuple(int(v) for v in d["source_box"]),  # type: ignore[arg-type]
            target=tuple(int(v) for v in d["target_box"]),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``fit``, ``original_size`` and ``model_size`` ``[H, W]``, ``source_box`` and
        ``target_box`` ``[x0, y0, x1, y1]``."""
        return {"fit": self.fit, "original_size": list(self.original), "model_size": list(self.model),
                "source_box": list(self.source), "target_box": list(self.target)}

    # -- points ------------------------------------------------------------------------------------------
    @property
    def scale(self) -> tuple[float, float]:
        """``(sx, sy)``: model pixels per original pixel along x and y."""
        sx0, sy0, sx1, sy1 = self.source
        tx0, ty0, tx1, ty1 = self.target
        return (tx1 - tx0) / (sx1 - sx0), (ty1 - ty0) / (sy1 - sy0)

    def forward(self, x: float, y: float) -> tuple[float, float]:
        """A point of the original image -> the model input."""
        sx, sy = self.scale
        return self.target[0] + (x - self.source[0]) * sx, self.target[1] + (y - self.source[1]) * sy

    def inverse(self, x: float, y: float) -> tuple[float, float]:
        """A point of the model input -> the original image."""
        sx, sy = self.scale
        return self.source[0] + (x - self.target[0]) / sx, self.source[1] + (y - self.target[1]) / sy

    @property
    def lossless(self) -> bool:
        """True when the model sees every pixel of the original (every fit but ``crop``, unless the crop
        box happens to be the whole image)."""
        return self.source == (0, 0, self.original[1], self.original[0])

    # -- images ------------------------------------------------------------------------------------------
    def apply(self, image: Image.Image) -> Image.Image:
        """The model's input: ``image`` (RGB; the original or a copy reduced with the same aspect ratio, e.g.
        decoded at a lower resolution) cropped to the source box, resized (bilinear) into the target box,
        padded with :data:`PAD_VALUE`. Returns an RGB image of size :attr:`model`."""
        from PIL import Image as PILImage

        iw, ih = image.size
        oh, ow = self.original
        fx, fy = iw / ow, ih / oh
        x0, y0, x1, y1 = self.source
        tx0, ty0, tx1, ty1 = self.target
        box = (x0 * fx, y0 * fy, x1 * fx, y1 * fy)
        # crop first, so the filter never reads pixels outside the box (edges clamp, as for a cropped file)
        outer = (math.floor(box[0]), math.floor(box[1]), min(iw, math.ceil(box[2])), min(ih, math.ceil(box[3])))
        rgb = image.convert("RGB")
        if outer != (0, 0, iw, ih):
            rgb = rgb.crop(outer)
        local = (box[0] - outer[0], box[1] - outer[1], box[2] - outer[0], box[3] - outer[1])
        inner = rgb.resize((tx1 - tx0, ty1 - ty0), PILImage.Resampling.BILINEAR, box=local)
        mh, mw = self.model
        if (tx0, ty0, tx1, ty1) == (0, 0, mw, mh):
            return inner
        canvas = PILImage.new("RGB", (mw, mh), PAD_VALUE)
        canvas.paste(inner, (tx0, ty0))
        return canvas

    def valid_mask(self) -> np.ndarray:
        """``(H, W) bool`` at the model size: True on the image, False on padding."""
        mask = np.zeros(self.model, dtype=bool)
        x0, y0, x1, y1 = self.target
        mask[y0:y1, x0:x1] = True
        return mask

    # -- maps back to the original -----------------------------------------------------------------------
    def _back(self, maps: torch.Tensor, mode: str) -> torch.Tensor:
        """``(C, h, w)`` maps at the model size -> ``(C, H, W)`` at the original size: the target box is cut
        out, resized to the source box (``mode``), and edge-replicated over what a crop left out."""
        import torch.nn.functional as F

        if tuple(maps.shape[-2:]) != self.model:
            raise ConfigError(f"maps of size {tuple(maps.shape[-2:])} do not match the model input {self.model}")
        tx0, ty0, tx1, ty1 = self.target
        sx0, sy0, sx1, sy1 = self.source
        oh, ow = self.original
        inner = maps[:, ty0:ty1, tx0:tx1]
        size = (sy1 - sy0, sx1 - sx0)
        if tuple(inner.shape[-2:]) != size:
            kwargs = {"align_corners": False} if mode == "bilinear" else {}
            inner = F.interpolate(inner[None], size=size, mode=mode, **kwargs)[0]
        pads = (sx0, ow - sx1, sy0, oh - sy1)
        if any(pads):
            dtype = inner.dtype
            work = inner if dtype.is_floating_point else inner.float()
            inner = F.pad(work[None], pads, mode="replicate")[0].to(dtype)
        return inner

    def labels_to_original(self, labels: Any) -> np.ndarray:
        """``(h, w)`` integer labels at the model size -> ``(H, W)`` at the original size (nearest, pixel
        centres aligned). The dtype is the smallest of uint8, uint16, int64 that holds them."""
        import torch

        t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).cpu()
        hi = int(t.max()) if t.numel() else 0
        lo = int(t.min()) if t.numel() else 0
        dtype = torch.uint8 if lo >= 0 and hi < 256 else (torch.int16 if lo >= -(2**15) and hi < 2**15 else None)
        work = t.to(dtype) if dtype is not None else t.to(torch.float64)
        out = self._back(work[None], "nearest-exact")[0]
        arr = out.numpy()
        if dtype is torch.int16:
            arr = arr.astype(np.uint16) if lo >= 0 else arr
        elif dtype is None:
            arr = arr.astype(np.int64)
        return arr

    def scores_to_original(self, scores: torch.Tensor) -> torch.Tensor:
        """``(K, h, w)`` continuous maps at the model size -> ``(K, H, W)`` float32 (bilinear); boolean masks
        come back nearest."""
        import torch

        if scores.dtype == torch.bool:
            return self._back(scores.to(torch.uint8), "nearest-exact").bool()
        return self._back(scores.float(), "bilinear")

    def result_to_original(self, result: SegmentationResult) -> SegmentationResult:
        """A result at the model size -> the same at the original size (labels nearest, scores bilinear,
        masks nearest), its ``meta["geometry"]`` set to :meth:`to_dict`."""
        import torch

        labels = torch.from_numpy(self.labels_to_original(result.labels).astype(np.int64))
        scores = self.scores_to_original(result.scores) if result.scores is not None else None
        return replace(result, labels=labels, scores=scores, meta={**result.meta, "geometry": self.to_dict()})


def place(
    original: tuple[int, int], resolution: tuple[int, int], fit: Fit, *, multiple: int | None = None
) -> Placement:
    """The placement of an ``original``-sized image for a model whose input is ``resolution``.

    Args:
        original: ``(H, W)`` of the image.
        resolution: ``(H, W)`` model input (for ``"native"``: the area to keep).
        fit: see :data:`Fit`.
        multiple: the model's size multiple, needed by ``"native"`` (None: the model accepts only
            ``resolution``, and ``"native"`` is refused).
    """
    fit = check_fit(fit)
    if fit == "native":
        if multiple is None:
            raise ConfigError("fit 'native' needs a model that accepts any aspect ratio; this one does not: "
                              "use fit 'pad' (or 'resize')")
        return Placement.create(original, native_size(original, resolution, multiple), "native")
    return Placement.create(original, resolution, fit)
