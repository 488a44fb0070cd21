"""Exceptions raised by attnseg.

Every error a user can trigger derives from :class:`AttnSegError`, so callers (and the CLI)
can catch one type and show a one-line message.
"""

from __future__ import annotations

__all__ = [
    "AttnSegError",
    "ConfigError",
    "DatasetError",
    "ImageError",
    "InvalidModelError",
    "ModelNotFoundError",
    "RunLockedError",
    "StoreError",
    "TokenNotFoundError",
    "UnsupportedModelError",
]


class AttnSegError(Exception):
    """Base class of all errors raised on bad input or configuration."""


class ConfigError(AttnSegError, ValueError):
    """An invalid hyper-parameter, option or combination of options."""


class ImageError(AttnSegError, ValueError):
    """An image that is missing, unreadable, of an unusable kind or too small."""


class ModelNotFoundError(AttnSegError, FileNotFoundError):
    """A model id or folder that cannot be found (offline, typo, missing files)."""


class InvalidModelError(AttnSegError, ValueError):
    """A model folder whose files are malformed (invalid JSON) or do not fit together (e.g. an SDXL UNet inside a
    Stable Diffusion 1.x folder)."""


class StoreError(AttnSegError, ValueError):
    """A saved attention store that is missing, unreadable or damaged."""


class RunLockedError(AttnSegError, RuntimeError):
    """An evaluation run folder (or one shard of it) that another live process is writing."""


class UnsupportedModelError(AttnSegError, NotImplementedError):
    """A model family or architecture that attnseg does not support (yet)."""


class TokenNotFoundError(AttnSegError, KeyError):
    """A word or phrase that is not in the prompt, or was cut off by the tokenizer."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DatasetError(AttnSegError, FileNotFoundError):
    """A dataset root that is missing or does not have the expected layout."""
