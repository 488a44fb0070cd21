"""Writers for image files that Pillow cannot produce (16-bit colour PNGs, oversized headers), for tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png16(path: Path, values: np.ndarray, *, sub_filter: bool = False) -> Path:
    """A 16-bit PNG from ``(H, W)``, ``(H, W, 2)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint16 samples, written
    byte by byte from the PNG specification; ``sub_filter`` uses filter 1 (Sub) on every row instead of 0."""
    arr = np.asarray(values, dtype=">u2")
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    stride, bpp = w * channels * 2, channels * 2
    raw = arr.reshape(h, w * channels).tobytes()
    rows = []
    for i in range(h):
        row = np.frombuffer(raw[i * stride : (i + 1) * stride], np.uint8)
        if sub_filter:
            left = np.concatenate([np.zeros(bpp, np.uint8), row[:-bpp]])
            rows.append(b"\x01" + (row - left).astype(np.uint8).tobytes())  # wraps mod 256 as the spec says
        else:
            rows.append(b"\x00" + row.tobytes())
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
    data += _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b"")
    Path(path).write_bytes(data)
    return Path(path)


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` RGB pixels, with one empty data chunk: what a
    decompression bomb looks like before it is decoded, at a few dozen bytes."""
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    data += _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")
    Path(path).write_bytes(data)
    return Path(path)
