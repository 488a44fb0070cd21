"""Loading images: any common file or array in, an RGB PIL image out, with clear errors."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from attnseg.errors import ImageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "expand_image_paths",
    "load_image",
    "pil_to_tensor",
    "resize_image",
    "tensor_to_pil",
    "to_rgb",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: grayscale is replicated, alpha is composited on white,
    16-bit and float images are rescaled from their own range (not clipped)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if image.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
        return Image.fromarray((arr * 255 + 0.5).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: str | Path | Image.Image | np.ndarray | Any, *, min_size: int = 1) -> Image.Image:
    """Load an image as RGB.

    Args:
        source: a path, a PIL image, an ``(H, W)`` / ``(H, W, 3|4)`` uint8 array, or a torch tensor
            ``(3, H, W)`` float in [0, 1].
        min_size: the smallest accepted side in pixels (e.g. the model's latent grid).

    Raises:
        ImageError: missing or unreadable file, not an image, unsupported array, too small.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"image not found: {path}")
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image")
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except UnidentifiedImageError:
            raise ImageError(f"{path} is not an image file (or an unsupported format)") from None
        except Image.DecompressionBombError:
            raise ImageError(
                f"{path} is too large to decode safely (over {2 * (Image.MAX_IMAGE_PIXELS or 0) // 1_000_000} MP, "
                "a possible decompression bomb); downscale it first"
            ) from None
        except OSError as exc:
            raise ImageError(f"cannot read image {path}: {exc}") from None
        name = str(path)
    elif isinstance(source, Image.Image):
        image, name = source, "image"
    else:
        arr = _as_array(source)
        image, name = Image.fromarray(arr), "array"
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = to_rgb(image)
    if min(image.size) < min_size:
        raise ImageError(f"{name} is {image.size[0]}x{image.size[1]} px; images must be at least {min_size} px a side")
    return image


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
        arr = (arr.astype(np.float64) / 65535 * 255 + 0.5).astype(np.uint8)
    elif arr.dtype.kind == "f":
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
