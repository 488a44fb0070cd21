"""Shared CLI helpers: parameter parsing, error reporting, progress."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer

from attnseg.errors import AttnSegError, ConfigError

__all__ = [
    "MODEL_CHOICES",
    "describe_model",
    "fail",
    "handle_errors",
    "method_parameters",
    "parse_params",
    "quiet_libraries",
    "require_model",
]

#: what --model takes, for messages
MODEL_CHOICES = (
    "a Hugging Face Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), a local diffusers folder, or "
    "'toyworld' (the bundled toy model, which only knows coloured shapes on plain backgrounds)"
)
TOY_NOTE = ("a toy model: it only knows the toy world (coloured circles, squares and triangles); for photographs "
            "use a Stable Diffusion model")


def fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def require_model(model: str | None) -> str:
    """``model``, or a one-line error listing what --model takes (commands that read real images need one)."""
    if model is None or not str(model).strip():
        fail(f"--model is required: {MODEL_CHOICES}; see `attnseg list`")
    return str(model)


def describe_model(adapter: Any, name: str) -> str:
    """One line naming the loaded model, and for a toy model what it can segment."""
    family = getattr(adapter, "family", "")
    h, w = getattr(adapter, "resolution", (0, 0))
    line = f"model: {name} ({family}, {w}x{h} px input)"
    if family == "toyworld":
        line += f"; {TOY_NOTE}"
    return line


@contextmanager
def handle_errors() -> Iterator[None]:
    """Turn attnseg's errors (and a few common library errors) into one-line messages and exit code 2."""
    try:
        yield
    except AttnSegError as exc:
        fail(str(exc))
    except MemoryError:
        fail("out of memory: try a smaller --size, --dtype bfloat16, or fewer images at once")
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        raise typer.Exit(130) from None


def _literal(text: str) -> Any:
    if "," in text and not text.startswith(("[", "(")):
        return tuple(_literal(t.strip()) for t in text.split(",") if t.strip())
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["kl_thresholds=0.9,0.9,0.9", "refine=true"]`` -> ``{"kl_thresholds": (0.9, 0.9, 0.9), "refine": True}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"method parameter {item!r} must look like NAME=VALUE")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = _literal(value.strip())
    return out


def method_parameters(cls: Callable[..., Any]) -> list[tuple[str, str]]:
    """Keyword-only hyper-parameters of a method class with their defaults, for ``attnseg list``."""
    sig = inspect.signature(cls)
    return [
        (name, "(required)" if p.default is inspect.Parameter.empty else repr(p.default))
        for name, p in sig.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and advisory logging: the CLI reports progress itself."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()
