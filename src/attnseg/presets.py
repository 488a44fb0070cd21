"""Which settings a method runs with: the model family's defaults, or a paper's exact settings.

Three layers, later ones winning:

1. the method's constructor defaults and :meth:`run_options` (the reference pass of its paper);
2. a **preset**: ``"family"`` (default) applies the adapter's ``recommended[method]`` settings, chosen so the
   method works on that family and resolution without tuning; ``"paper"`` applies the method's ``paper_preset``
   (e.g. DiffSeg's absolute KL threshold 1.1), which with the reference pass reproduces the paper;
3. what the user gives (constructor keywords, and run options such as ``timestep`` or ``size``).

A ``recommended`` entry is a dict of constructor keywords plus an optional ``"run"`` dict of run options
(``timestep``, ``add_noise``, ``prompt``, ``size``).

Example:
    >>> from attnseg.presets import resolve_settings
    >>> s = resolve_settings("diffseg", {"diffseg": {"run": {"timestep": 100}}}, preset="paper")
    >>> s.params["threshold_mode"], s.run
    ('absolute', {})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attnseg.errors import ConfigError

__all__ = ["PRESETS", "ResolvedSettings", "resolve_settings"]

PRESETS = ("family", "paper")
RUN_KEYS = ("timestep", "add_noise", "prompt", "size")


@dataclass(frozen=True)
class ResolvedSettings:
    """A method's effective settings.

    Attributes:
        method: the registered method name.
        preset: ``"family"`` or ``"paper"``.
        params: constructor keywords (preset, then the user's).
        run: run-option overrides (preset, then the user's); keys among ``timestep``, ``add_noise``, ``prompt``,
            ``size``.
        sources: where each entry of ``params`` and ``run`` came from (``"family"``, ``"paper"``, ``"user"``).
    """

    method: str
    preset: str
    params: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {
            "method": self.method,
            "preset": self.preset,
            "params": {k: plain(v) for k, v in self.params.items()},
            "run": {k: plain(v) for k, v in self.run.items()},
            "sources": dict(self.sources),
        }


def resolve_settings(
    method: str,
    recommended: Mapping[str, Mapping[str, Any]] | None,
    *,
    preset: str = "family",
    params: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
) -> ResolvedSettings:
    """Merge a method's preset with the user's settings (see the module docstring).

    Args:
        method: a registered method name.
        recommended: the adapter's ``recommended`` table (family -> settings per method); None for none.
        preset: ``"family"`` or ``"paper"``.
        params: the user's constructor keywords (win over the preset).
        run: the user's run options (win over the preset); None values are ignored.
    """
    from attnseg.methods.base import METHODS, _import_builtin_methods

    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {PRESETS}, got {preset!r}")
    _import_builtin_methods()
    cls = METHODS.get(method)
    if preset == "paper":
        base: dict[str, Any] = dict(getattr(cls, "paper_preset", {}))
    else:
        base = {k: v for k, v in dict((recommended or {}).get(method, {})).items()}
    base_run = dict(base.pop("run", {}) or {})
    unknown = sorted(set(base_run) - set(RUN_KEYS))
    if unknown:
        raise ConfigError(f"{preset} preset of {method!r}: unknown run options {unknown}; known: {list(RUN_KEYS)}")
    user = dict(params or {})
    # A mode the user sets re-interprets the values tied to it: the preset's values for the other mode go.
    for key, linked in dict(getattr(cls, "preset_links", {})).items():
        if key in user:
            for name in linked:
                if name not in user:
                    base.pop(name, None)
    user_run = {k: v for k, v in dict(run or {}).items() if v is not None}
    sources = {k: preset for k in (*base, *base_run)}
    sources.update({k: "user" for k in (*user, *user_run)})
    return ResolvedSettings(
        method=method, preset=preset, params={**base, **user}, run={**base_run, **user_run}, sources=sources
    )
