"""Loading images: any common file or array in, an RGB PIL image out, with clear errors."""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from attnseg.errors import ImageError
from attnseg.io import MAX_PIXELS

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "DecodedImage",
    "expand_image_paths",
    "load_image",
    "pil_to_tensor",
    "probe_image",
    "read_image",
    "resize_image",
    "significant_bits",
    "tensor_to_pil",
    "to_rgb",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})


HIGH_BIT_DEPTHS = (8, 10, 12, 14, 16)
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PIL_LIMIT_LOCK = threading.Lock()
_BAND_PIXELS = 1 << 20  # rows converted at once from high bit depth: a few MiB of temporaries


def significant_bits(values: np.ndarray) -> int:
    """The bit depth that high-bit-depth pixel values are scaled by: the smallest of 8, 10, 12, 14, 16 whose
    range ``[0, 2**b - 1]`` holds the brightest value.

    Cameras and scanners store 10-, 12- and 14-bit samples in 16-bit files; dividing those by 65535 would
    give an almost black picture. PNG's ``sBIT`` chunk could say the depth, but few writers set it and
    Pillow does not read it, so the data decides.

    Example:
        >>> significant_bits(np.array([0, 4095], np.uint16)), significant_bits(np.array([40000], np.uint16))
        (12, 16)
    """
    hi = int(values.max()) if values.size else 0
    for bits in HIGH_BIT_DEPTHS:
        if hi < 1 << bits:
            return bits
    return HIGH_BIT_DEPTHS[-1]


def _to_uint8(values: np.ndarray, scale: float, offset: float = 0.0) -> np.ndarray:
    """``(values - offset) * scale`` rounded to uint8, a band of rows at a time (bounded temporaries)."""
    out = np.empty(values.shape, np.uint8)
    rows = max(1, _BAND_PIXELS // max(1, values[0].size if values.ndim > 1 else 1))
    for r in range(0, values.shape[0], rows):
        band = values[r : r + rows].astype(np.float32)
        band -= offset
        band *= scale
        np.clip(band, 0, 255, out=band)
        band += 0.5
        out[r : r + rows] = band.astype(np.uint8)
    return out


def _high_bits_to_rgb(values: np.ndarray, *, alpha: np.ndarray | None = None) -> Image.Image:
    """``(H, W)`` or ``(H, W, 3)`` unsigned high-bit-depth samples -> 8-bit RGB, scaled by their own depth
    (:func:`significant_bits`); ``alpha`` (16-bit, full range) is composited on white."""
    bits = significant_bits(values)
    rgb = _to_uint8(values, 255.0 / ((1 << bits) - 1))
    image = Image.fromarray(rgb).convert("RGB")
    if alpha is not None:
        a = Image.fromarray(_to_uint8(alpha, 255.0 / 65535))
        image = Image.composite(image, Image.new("RGB", image.size, (255, 255, 255)), a)
    image.info["bit_depth"] = bits
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: grayscale is replicated, alpha is composited on white,
    16-bit integer images are scaled by their own bit depth (:func:`significant_bits`: 12-bit data in a
    16-bit file is divided by 4095, not 65535), 32-bit integer and float images by their own min-max range
    (float images already in [0, 1] are kept as they are)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        arr = np.asarray(image)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            lo, hi = float(arr.min()), float(arr.max())
            return Image.fromarray(_to_uint8(arr, 255.0 / (hi - lo), lo)).convert("RGB")
        return _high_bits_to_rgb(arr.astype(np.uint16, copy=False))
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(_to_uint8(arr, scale, lo)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class DecodedImage:
    """An image as read from a file or array, ready for a model.

    Attributes:
        image: RGB, 8 bits a channel; upright (EXIF orientation applied); possibly reduced while decoding
            (then smaller than :attr:`size`, with the same aspect ratio up to rounding).
        size: ``(H, W)`` of the full-resolution upright image: the size outputs are written at.
        source: the path, or a short description of an in-memory input.
        bit_depth: significant bits a channel that the samples were scaled by (8 for ordinary images).
        orientation: the EXIF orientation applied (1: none).
    """

    image: Image.Image
    size: tuple[int, int]
    source: str = "image"
    bit_depth: int = 8
    orientation: int = 1

    @property
    def reduced(self) -> bool:
        return (self.image.size[1], self.image.size[0]) != self.size


def _rawmode(tile: Any) -> str:
    args = tile.args
    return args if isinstance(args, str) else str(args[0]) if args else ""


def _with_rawmode(tile: Any, rawmode: str) -> Any:
    args = tile.args
    return tile._replace(args=rawmode if isinstance(args, str) else (rawmode, *tuple(args[1:])))


_LOW_BYTES = {"16B": "16L", "16L": "16B", "16N": "16B" if sys.byteorder == "little" else "16L"}


def _decode_16bit_colour(path: Path, im: Image.Image, tiles: list[Any]) -> Image.Image | None:
    """16-bit RGB(A) files, which Pillow decodes to their high bytes only: decode again for the low bytes
    (the same decoder with the byte order swapped) and rebuild the 16-bit samples. None when the file is
    not such an image or the decoder cannot be re-targeted."""
    if im.mode not in ("RGB", "RGBA") or not tiles:
        return None
    raw = _rawmode(tiles[0])
    if not raw.startswith(("RGB;16", "RGBA;16")) or raw[-3:] not in _LOW_BYTES:
        return None
    swapped = raw[:-3] + _LOW_BYTES[raw[-3:]]
    try:
        with Image.open(path) as low:
            low.tile = [_with_rawmode(t, swapped) for t in low.tile]
            low.load()
            lo = np.asarray(low)
    except Exception:  # a decoder that cannot be re-targeted: keep the 8-bit decode
        return None
    hi = np.asarray(im)
    values = (hi.astype(np.uint16) << 8) | lo
    del hi, lo
    alpha = values[..., 3] if values.shape[-1] == 4 else None
    return _high_bits_to_rgb(values[..., :3], alpha=alpha)


def _pixel_limit_error(name: str, width: int, height: int, max_pixels: int) -> ImageError:
    mp = width * height / 1e6
    return ImageError(
        f"{name} is too large to decode safely: {width}x{height} px ({mp:.0f} megapixels), over the limit of "
        f"{max_pixels / 1e6:.3g} megapixels (a possible decompression bomb); downscale it, or if it is a real image "
        "raise the limit (--max-megapixels)"
    )


def _open(path: Path, max_pixels: int) -> Image.Image:
    """``Image.open`` (the header only), with errors as :class:`ImageError`; more than ``max_pixels`` pixels
    is refused here, with the size in the message, before any pixel is decoded."""
    try:
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # our own limit is checked below, with the size in the message
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image file (or an unsupported format)") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise _pixel_limit_error(str(path), width, height, max_pixels)
    return im


def read_image(
    source: str | Path | Image.Image | np.ndarray | Any,
    *,
    max_side: int | None = None,
    max_pixels: int = MAX_PIXELS,
    min_size: int = 1,
) -> DecodedImage:
    """Read an image the way photographs arrive: upright, 8-bit RGB, reduced while decoding when large.

    - EXIF orientation is applied (a phone photo stored sideways comes out upright); :attr:`DecodedImage.size`
      is the upright size.
    - 16-bit images (grayscale, RGB, RGBA) are scaled by their own bit depth (:func:`significant_bits`).
    - With ``max_side``, images whose longer side exceeds it are reduced: JPEGs while decoding (draft mode,
      a power-of-two reduction by the decoder, so memory follows the reduced size), other formats right
      after decoding; the result's longer side is ``max_side`` or a little more.
    - A file of more than ``max_pixels`` pixels is refused from its header, before decoding.

    Args:
        source: a path, a PIL image, an ``(H, W)`` / ``(H, W, 3|4)`` uint8/uint16/float array, or a torch
            tensor ``(3, H, W)`` float in [0, 1].
        max_side: reduce to about this longer side (None: full resolution).
        max_pixels: refuse images with more pixels (default :data:`MAX_PIXELS`).
        min_size: the smallest accepted side in pixels.

    Raises:
        ImageError: missing or unreadable file, not an image, too many pixels, unsupported array, too small.
    """
    if max_side is not None and max_side < 1:
        raise ImageError(f"max_side must be >= 1, got {max_side}")
    orientation, bits = 1, 8
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"image not found: {path}")
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image")
        name = str(path)
        im = _open(path, max_pixels)
        image = im
        tiles = list(im.tile)  # the decoder's raw modes, before anything loads the pixels and clears them
        try:
            width, height = im.size
            if width * height > max_pixels:
                raise _pixel_limit_error(name, width, height, max_pixels)
            try:
                orientation = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
            except Exception:  # a damaged EXIF block is ignored, as viewers do
                orientation = 1
            if max_side is not None and max(width, height) > max_side and im.format == "JPEG":
                r = max_side / max(width, height)
                im.draft(im.mode, (max(1, round(width * r)), max(1, round(height * r))))
            im.load()
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            deep = _decode_16bit_colour(path, im, tiles)
            image = deep if deep is not None else to_rgb(im)
            if image is im and getattr(im, "fp", None) is not None:  # multi-frame files stay open: detach
                image = im.copy()
        except (ImageError, MemoryError):
            raise
        except Exception as exc:  # decoders raise many kinds of errors on damaged data (OSError, EOFError...)
            raise ImageError(f"cannot read image {path}: {exc}") from None
        finally:
            if image is not im:
                im.close()
    elif isinstance(source, Image.Image):
        name = "image"
        width, height = source.size
        try:
            orientation = int(source.getexif().get(_ORIENTATION_TAG, 1) or 1)
        except Exception:
            orientation = 1
        if getattr(source, "n_frames", 1) > 1:
            source.seek(0)
        image = to_rgb(source)
    else:
        arr = _as_array(source)
        name = "array"
        height, width = arr.shape[:2]
        image = to_rgb(Image.fromarray(arr)) if arr.dtype != np.uint16 else _array_16(arr)
    bits = int(image.info.get("bit_depth", 8))
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
        if orientation >= 5:
            width, height = height, width
    if min(width, height) < min_size:
        raise ImageError(f"{name} is {width}x{height} px; images must be at least {min_size} px a side")
    if max_side is not None and max(image.size) > max_side:  # a new image: the caller's is never changed
        r = max_side / max(image.size)
        reduced = (max(1, round(image.width * r)), max(1, round(image.height * r)))
        image = image.resize(reduced, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return DecodedImage(image=image, size=(height, width), source=name, bit_depth=bits, orientation=orientation)


def probe_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header alone (upright, EXIF orientation applied), with the errors
    of :func:`read_image` for a missing file, a file that is not an image, or too many pixels."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image")
    with _open(path, max_pixels) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise _pixel_limit_error(str(path), width, height, max_pixels)
        try:
            orientation = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1) if im.format == "JPEG" else 1
        except Exception:
            orientation = 1
    return (width, height) if orientation >= 5 else (height, width)


def _array_16(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 4:
        return _high_bits_to_rgb(arr[..., :3], alpha=arr[..., 3])
    return _high_bits_to_rgb(arr)


def load_image(source: str | Path | Image.Image | np.ndarray | Any, *, min_size: int = 1) -> Image.Image:
    """Load an image as upright 8-bit RGB at full resolution (see :func:`read_image` for the rules).

    Args:
        source: a path, a PIL image, an ``(H, W)`` / ``(H, W, 3|4)`` uint8/uint16/float array, or a torch
            tensor ``(3, H, W)`` float in [0, 1].
        min_size: the smallest accepted side in pixels (e.g. the model's latent grid).

    Raises:
        ImageError: missing or unreadable file, not an image, unsupported array, too small.
    """
    return read_image(source, min_size=min_size).image


def _as_array(source: Any) -> np.ndarray:
    if hasattr(source, "detach"):  # torch tensor, CHW float in [0, 1]
        t = source.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        arr = t.numpy()
        if arr.dtype.kind == "f":
            arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    elif isinstance(source, np.ndarray):
        arr = source
    else:
        raise ImageError(f"cannot read an image from a {type(source).__name__}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.dtype == np.uint16:
        return arr  # scaled by its own bit depth by the caller
    if arr.dtype.kind == "f":
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(f"unsupported image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    return arr


def expand_image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand folders into the image files they contain (sorted, non-recursive); keep files as given."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not files:
                raise ImageError(f"folder {p} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(files)
        else:
            out.append(p)
    return out


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``(1, 3, H, W)`` float32 in [-1, 1]."""
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def resize_image(image: Image.Image, size: tuple[int, int], mode: Literal["center-crop", "resize"]) -> Image.Image:
    """Resize a PIL image to ``size = (H, W)``: centre crop to the target aspect ratio first, or squash."""
    h, w = size
    if mode == "center-crop":
        iw, ih = image.size
        scale = max(w / iw, h / ih)
        cw, ch = round(w / scale), round(h / scale)
        left, top = (iw - cw) // 2, (ih - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
    elif mode != "resize":
        raise ImageError(f"crop must be 'center-crop' or 'resize', got {mode!r}")
    return image.resize((w, h), Image.Resampling.BILINEAR)


def tensor_to_pil(pixels: torch.Tensor) -> Image.Image:
    """First image of ``(B, 3, H, W)`` float in [-1, 1] -> RGB PIL image (the inverse of :func:`pil_to_tensor`)."""
    arr = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
