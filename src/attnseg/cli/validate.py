"""Checks of command-line input that run before anything heavy is imported, allocated or written.

The commands call them in this order: parameters (no I/O), input files, the model's description
(:func:`attnseg.models.spec.describe_model`: JSON files only), the method's hyper-parameters, the words against
the model's tokenizer, the output folder. Only then is the model loaded and ``--out`` created. Every check raises
:class:`~attnseg.errors.ConfigError` (or another :class:`~attnseg.errors.AttnSegError`) with one line that names
the problem and the fix.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnseg.errors import ConfigError, ImageError
from attnseg.models.spec import DTYPES, check_device, check_dtype

if TYPE_CHECKING:
    from attnseg.methods.base import Segmenter

__all__ = [
    "DTYPES",
    "check_device",
    "check_dtype",
    "check_finite",
    "check_images",
    "check_int",
    "check_method_words",
    "check_out_dir",
    "make_method",
    "parse_int_list",
    "precheck_words",
]

# what the method's named shortcuts are called on the command line
_FLAGS = {"ks": "--k", "classes": "--classes", "target": "--target", "variant": "--variant", "prompt": "--prompt"}


def parse_int_list(text: str | None, flag: str, *, minimum: int = 1, example: str = "2,5,10") -> tuple[int, ...] | None:
    """``"2,5,10"`` -> ``(2, 5, 10)``; None stays None. Anything else (``abc``, ``2.5``, ``,``) is refused."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ConfigError(f"{flag} is empty; give whole numbers separated by commas, e.g. {flag} {example}")
    values = []
    for part in parts:
        if not part:
            continue
        if not re.fullmatch(r"[+]?\d+", part):
            raise ConfigError(f"{flag} takes whole numbers separated by commas, e.g. {flag} {example}; "
                              f"{part!r} is not one")
        value = int(part)
        if value < minimum:
            raise ConfigError(f"{flag} values must be >= {minimum}, got {value}; e.g. {flag} {example}")
        values.append(value)
    return tuple(values)


def check_int(value: int | None, flag: str, *, minimum: int, hint: str = "") -> None:
    """Refuse an integer option below ``minimum`` (None = not given, accepted)."""
    if value is None:
        return
    if value < minimum:
        raise ConfigError(f"{flag} must be >= {minimum}, got {value}{'; ' + hint if hint else ''}")


def check_finite(value: float | None, flag: str, *, minimum: float | None = None, hint: str = "") -> None:
    """Refuse ``nan``, ``inf`` and values below ``minimum`` (None = not given, accepted)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value}{'; ' + hint if hint else ''}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{flag} must be >= {minimum}, got {value}{'; ' + hint if hint else ''}")


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """``out`` must be a folder that can be created (or exists) and written; nothing is created here."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{flag} {out} is a file; give a folder (it is created if needed)")
        target = out
    else:
        target = out.parent
        while not target.exists():
            if target == target.parent:
                break
            target = target.parent
        if target.exists() and not target.is_dir():
            raise ConfigError(f"{flag} {out} cannot be created: {target} is a file; give another folder")
    if not os.access(target, os.W_OK | os.X_OK) or _read_only(target):
        raise ConfigError(f"{flag} {out} cannot be written: no write permission in {target}; give another folder")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_images(inputs: Iterable[Path]) -> list[Path]:
    """Expand folders into their images and check that every file exists (images are decoded later)."""
    inputs = [Path(p) for p in inputs]
    for path in inputs:  # before importing numpy and PIL: a typo answers at once
        if not path.exists():
            raise ImageError(f"image not found: {path} (check the path)")
    from attnseg.io.images import expand_image_paths

    paths = expand_image_paths(inputs)
    for path in paths:
        if not path.exists():
            raise ImageError(f"image not found: {path} (check the path)")
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image")
    return paths


def make_method(name: str, kwargs: Mapping[str, Any], *, flags: Mapping[str, str] | None = None) -> Segmenter:
    """Create a registered method, naming the flag of a missing required hyper-parameter (e.g. goca's --classes).

    ``flags`` maps hyper-parameters to the command's shortcut options (default: ``segment``'s); the others are
    named as ``-P NAME=VALUE``.
    """
    flags = _FLAGS if flags is None else flags
    from attnseg.methods.base import METHODS, create_method, list_methods

    list_methods()  # registers the built-in methods
    cls = METHODS.get(name)
    params = inspect.signature(cls).parameters
    missing = [
        n for n, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty and n not in kwargs
    ]
    if missing:
        named = ", ".join(flags.get(n, f"-P {n}=VALUE") for n in missing)
        example = " (e.g. --classes 'cat, grass, sky')" if "classes" in missing and "classes" in flags else ""
        raise ConfigError(f"method {name!r} needs {named}{example}")
    try:
        return create_method(name, **kwargs)
    except TypeError as exc:  # a value of the wrong kind that the method did not check itself
        raise ConfigError(f"method {name!r}: {exc}") from None


def _known_examples(tokenizer: Any) -> str:
    vocab = getattr(tokenizer, "vocab", None)
    if isinstance(vocab, Sequence) and len(vocab) < 1000:  # a small word-level vocabulary: show some of it
        words = [w for w in vocab if re.fullmatch(r"\w+", w) and not w.startswith("<")]
        return f"; words it knows include {', '.join(words[:12])}" if words else ""
    return ""


def _phrases(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return ()


def precheck_words(kwargs: Mapping[str, Any], load_tokenizer: Callable[[], Any]) -> None:
    """The words given explicitly (``classes``, ``background_objects``, ``target``), checked before the method's
    module is even imported; :func:`check_method_words` checks the method's own defaults afterwards."""
    from attnseg.prompts import unknown_words

    given = {attr: _phrases(kwargs.get(attr)) for attr in ("classes", "background_objects")}
    if isinstance(kwargs.get("target"), str):
        given["target"] = (kwargs["target"].strip(),)
    given = {k: v for k, v in given.items() if v}
    if not given:
        return
    tokenizer = load_tokenizer()
    bad = {attr: unknown_words(tokenizer, phrases) for attr, phrases in given.items()}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        words = sorted({w for found in bad.values() for ws in found.values() for w in ws})
        listed = ", ".join(repr(w) for w in words)
        what = " and ".join(_FLAGS.get(a, a.replace("_", " ")) for a in bad)
        raise ConfigError(
            f"the model's vocabulary cannot represent {listed} ({what}): its segment would be guesswork; use words "
            f"the model knows, or pass --allow-unknown to skip them{_known_examples(tokenizer)}"
        )


def check_method_words(
    method: Segmenter, name: str, kwargs: Mapping[str, Any], load_tokenizer: Callable[[], Any], *,
    allow_unknown: bool = False, warn: Callable[[str], None] | None = None,
) -> Segmenter:
    """Refuse class names, background objects and targets the model's vocabulary cannot represent.

    ``load_tokenizer`` is called only when the method names words (e.g. :meth:`ModelSpec.tokenizer`). With
    ``allow_unknown`` the unknown classes and background objects are dropped (``warn`` is called with one line)
    and the method is rebuilt without them; a method left with nothing to look for is still an error.
    """
    from attnseg.prompts import unknown_words

    groups: dict[str, tuple[str, ...]] = {}
    for attr in ("classes", "background_objects"):
        value = getattr(method, attr, None)
        if value:
            groups[attr] = tuple(value)
    target = getattr(method, "target", None)
    if isinstance(target, str) and target:
        groups["target"] = (target,)
    if not groups:
        return method
    tokenizer = load_tokenizer()
    unknown = {attr: unknown_words(tokenizer, phrases) for attr, phrases in groups.items()}
    unknown = {k: v for k, v in unknown.items() if v}
    if not unknown:
        return method
    words = sorted({w for bad in unknown.values() for ws in bad.values() for w in ws})
    listed = ", ".join(repr(w) for w in words)
    what = " and ".join(_FLAGS.get(a, a.replace("_", " ")) for a in unknown)
    if not allow_unknown:
        raise ConfigError(
            f"the model's vocabulary cannot represent {listed} ({what}): its segment would be guesswork; use words "
            f"the model knows, or pass --allow-unknown to skip them{_known_examples(tokenizer)}"
        )
    if "target" in unknown:
        raise ConfigError(f"the model's vocabulary cannot represent the target {listed}; there is nothing left to "
                          f"segment (--allow-unknown skips unknown classes only){_known_examples(tokenizer)}")
    new = dict(kwargs)
    for attr, bad in unknown.items():
        kept = [p for p in groups[attr] if p not in bad]
        if attr == "classes" and not kept:
            raise ConfigError(f"the model's vocabulary cannot represent any of the classes ({listed}); nothing is "
                              f"left to segment{_known_examples(tokenizer)}")
        new[attr] = kept
    if warn is not None:
        warn(f"skipping {listed}: the model's vocabulary cannot represent {'it' if len(words) == 1 else 'them'}")
    return make_method(name, new)
