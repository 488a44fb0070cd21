"""Shared CLI helpers: parameter parsing, error reporting, progress.

Every failure reaches the terminal as one line on stderr:

- bad input or configuration (:class:`~attnseg.errors.AttnSegError`, usage errors): ``error: ...``, exit code 2;
- an unexpected exception (a bug): ``error: unexpected ...; re-run with --debug ...``, exit code 1;
- Ctrl-C: ``interrupted``, exit code 130.

``--debug`` (``attnseg --debug CMD ...``, or anywhere on the command line, or ``ATTNSEG_DEBUG=1``) lets the
exception through with its traceback instead.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from attnseg.errors import AttnSegError, ConfigError

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "MODEL_CHOICES",
    "TOY_NOTE",
    "OneLineErrorGroup",
    "add_debug_option",
    "debug_enabled",
    "describe_exception",
    "fail",
    "handle_errors",
    "method_parameters",
    "model_banner",
    "parse_params",
    "quiet_libraries",
    "require_model",
    "set_debug",
    "warn",
]

#: what --model takes, for messages
MODEL_CHOICES = (
    "a Hugging Face Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), a local diffusers folder, or "
    "'toyworld' / 'toyworld-flux' (the bundled toy models, which only know textured shapes on textured backgrounds)"
)
TOY_NOTE = ("a toy model: it only knows the toy world (textured circles, squares, triangles and crosses); for "
            "photographs use a Stable Diffusion model")

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

_state = {"debug": False}


def set_debug(on: bool) -> None:
    """Let exceptions through with their traceback (``--debug``)."""
    _state["debug"] = bool(on)


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get("ATTNSEG_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    typer.secho(f"error: {_one_line(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """One warning line on stderr (not an error: the command goes on)."""
    typer.secho(f"warning: {_one_line(message)}", fg=typer.colors.YELLOW, err=True)


def _click_exceptions() -> Any:
    """The exception module of the click typer runs on (typer >= 0.24 vendors it as ``typer._click``)."""
    try:
        from typer._click import exceptions
    except ImportError:  # older typer: click itself
        from click import exceptions  # type: ignore[no-redef]
    return exceptions


def _classes(*candidates: Any) -> tuple[type[BaseException], ...]:
    """The exception classes among ``candidates`` (None for the ones a click version lacks), for ``except``."""
    return tuple(c for c in candidates if isinstance(c, type) and issubclass(c, BaseException))


def _is_control_flow(exc: BaseException) -> bool:
    click = _click_exceptions()
    return isinstance(exc, _classes(SystemExit, typer.Exit, typer.Abort, click.ClickException,
                                    getattr(click, "Exit", None), getattr(click, "Abort", None)))


def describe_exception(exc: BaseException) -> tuple[str, int]:
    """``(one-line message, exit code)`` for an exception that reached the command line."""
    if isinstance(exc, AttnSegError):
        return _one_line(str(exc)) or type(exc).__name__, EXIT_BAD_INPUT
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, MemoryError):
        return ("out of memory: try a smaller --size, --dtype bfloat16, or fewer images at once",
                EXIT_BAD_INPUT)
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"the disk is full{where}: free some space, then re-run the same command", EXIT_BAD_INPUT
    detail = _one_line(str(exc))[:200]
    return (
        f"unexpected {type(exc).__name__}{': ' + detail if detail else ''} (an attnseg bug; re-run with --debug "
        "for the traceback and report it)",
        EXIT_INTERNAL,
    )


def _report(exc: BaseException) -> NoReturn:
    message, code = describe_exception(exc)
    if code == EXIT_INTERRUPTED:
        typer.secho(message, err=True)
    else:
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def require_model(model: str | None) -> str:
    """``model``, or a one-line error listing what --model takes (commands that read real images need one)."""
    if model is None or not str(model).strip():
        fail(f"--model is required: {MODEL_CHOICES}; see `attnseg list`")
    return str(model)


def model_banner(adapter: Any, name: str) -> str:
    """One line naming the loaded model, and for a toy model what it can segment (``adapter``: anything with
    ``family`` and ``resolution``, e.g. an adapter or a :class:`~attnseg.models.spec.ModelSpec`)."""
    family = getattr(adapter, "family", "")
    h, w = getattr(adapter, "resolution", (0, 0))
    line = f"model: {name} ({family}, {w}x{h} px input)"
    if family in ("toyworld", "toyworld-flux"):
        line += f"; {TOY_NOTE}"
    return line


@contextmanager
def handle_errors() -> Iterator[None]:
    """Turn any exception into one line on stderr and an exit code (see the module docstring)."""
    try:
        yield
    except BaseException as exc:
        if _is_control_flow(exc) or (debug_enabled() and not isinstance(exc, KeyboardInterrupt)):
            raise
        _report(exc)


def add_debug_option(app: typer.Typer) -> None:
    """Give ``app`` the ``--debug`` option (show tracebacks instead of one-line errors)."""

    @app.callback()
    def _options(
        debug: bool = typer.Option(
            False, "--debug", help="Show the full traceback of an error (also accepted after the command's options)."
        ),
    ) -> None:
        set_debug(debug)


def _move_debug_flag(args: Sequence[str]) -> list[str]:
    """``--debug`` is accepted anywhere before a literal ``--``: it is moved to the front, where the app takes it."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        args = ["--debug"] + [a for i, a in enumerate(args) if not (a == "--debug" and i < end)]
    return args


class OneLineErrorGroup(TyperGroup):
    """The app's command group: usage errors and uncaught exceptions become one line (see the module docstring)."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
        standalone_mode: bool = True, **extra: Any,
    ) -> Any:
        click = _click_exceptions()
        ClickException, UsageError = click.ClickException, click.UsageError
        NoArgsIsHelpError = _classes(getattr(click, "NoArgsIsHelpError", None))
        Abort = _classes(typer.Abort, getattr(click, "Abort", None))

        args = _move_debug_flag(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            typer.secho(f"error: {_one_line(exc.format_message())}{where}", fg=typer.colors.RED, err=True)
            sys.exit(exc.exit_code)
        except ClickException as exc:
            typer.secho(f"error: {_one_line(exc.format_message())}", fg=typer.colors.RED, err=True)
            sys.exit(exc.exit_code)
        except Abort:
            typer.secho("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BaseException as exc:
            if isinstance(exc, SystemExit) or (debug_enabled() and not isinstance(exc, KeyboardInterrupt)):
                raise
            message, code = describe_exception(exc)
            typer.secho(message if code == EXIT_INTERRUPTED else f"error: {message}",
                        fg=None if code == EXIT_INTERRUPTED else typer.colors.RED, err=True)
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


def _literal(text: str) -> Any:
    if "," in text and not text.startswith(("[", "(")):
        return tuple(_literal(t.strip()) for t in text.split(",") if t.strip())
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["kl_thresholds=0.9,0.9,0.9", "refine=true"]`` -> ``{"kl_thresholds": (0.9, 0.9, 0.9), "refine": True}``;
    a name given twice takes its last value."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"parameter {item!r} must look like NAME=VALUE, e.g. -P refine=true")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key.isidentifier():
            raise ConfigError(f"parameter name {key!r} in {item!r} is not a name; use NAME=VALUE, e.g. -P refine=true")
        out[key] = _literal(value.strip())
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
    """Silence diffusers/transformers progress bars and advisory logging: the CLI reports progress itself.

    Imports diffusers and transformers: call it once the cheap checks have passed, right before loading a model.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()
