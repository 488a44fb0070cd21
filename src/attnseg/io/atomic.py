"""Atomic file writes: a temporary file in the same folder, then a rename over the target.

A reader never sees half a file, and a failed write (a full disk, a kill) leaves the old file or none, never a
truncated one that a resumed run would trust. Light: no numpy, PIL or torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` (``.NAME.PID.tmp``) to write to; when the block ends without an error it
    is renamed over ``path``, and in every case no temporary file is left behind.

    Example:
        >>> with atomic_path(folder / "data.bin") as tmp:  # doctest: +SKIP
        ...     tmp.write_bytes(payload)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (fsync before the rename); returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path
