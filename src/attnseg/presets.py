"""Which settings a method runs with: the model family's defaults, or a paper's exact settings.

Three layers, later ones winning:

1. the method's constructor defaults and :meth:`run_options` (the reference pass of its paper);
2. a **preset**: ``"family"`` (default) applies the model family's settings for the method, chosen so it works on
   that family and resolution without tuning; ``"paper"`` applies the method's ``paper_preset`` (e.g. DiffSeg's
   absolute KL threshold 1.1), which with the reference pass reproduces the paper;
3. what the user gives (constructor keywords, and run options such as ``timestep`` or ``size``).

:func:`resolve_settings` is the one place that merges them; the pipeline calls it for a method given by name, and
the command line, the web page and ``attnseg list`` go through it.

The family's settings come from its adapter: :meth:`~attnseg.models.base.DiffusionAdapter.method_defaults`
reads the adapter's ``recommended`` table (:func:`table_defaults`) and may adapt it to the loaded model
(diffusion transformers map the reference checkpoint's layer names to the model's depth). A ``recommended`` entry
is a dict of constructor keywords, plus an optional ``"run"`` dict of run options (``timestep``, ``add_noise``,
``prompt``, ``size``) and an optional ``"variants"`` dict of per-variant overrides, merged in for the variant that
runs: the user's ``variant`` keyword, else the entry's own ``variant``, else the method's constructor default.

Example:
    >>> from attnseg.presets import resolve_settings
    >>> s = resolve_settings("diffseg", {"diffseg": {"run": {"timestep": 100}}}, preset="paper")
    >>> s.params["threshold_mode"], s.run
    ('absolute', {})
    >>> table = {"goca": {"timestep": 300, "variants": {"vanilla": {"timestep": 200}}}}
    >>> resolve_settings("goca", table, params={"variant": "vanilla", "classes": ["cat"]}).params["timestep"]
    200
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attnseg.errors import ConfigError

__all__ = ["PRESETS", "RUN_KEYS", "ResolvedSettings", "family_settings", "resolve_settings", "table_defaults"]

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


def table_defaults(
    recommended: Mapping[str, Mapping[str, Any]] | None, method: str, *, variant: str | None = None
) -> dict[str, Any]:
    """The entry of ``method`` in a ``recommended`` table (a deep copy): its ``"variants"`` removed, the overrides of
    ``variant`` (when it has some) merged in. Nothing else is interpreted here (``"run"`` stays)."""
    entry = (recommended or {}).get(method, {})
    params = copy.deepcopy(dict(entry)) if isinstance(entry, Mapping) else {}
    variants = params.pop("variants", {}) or {}
    if variant is not None and variant in variants:
        params.update(copy.deepcopy(dict(variants[variant])))
    return params


def _constructor_default(cls: Any, name: str) -> Any:
    try:
        param = inspect.signature(cls).parameters.get(name)
    except (TypeError, ValueError):
        return None
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return param.default


def family_settings(method: str, family: Any, *, variant: str | None = None) -> dict[str, Any]:
    """The family's settings for ``method`` (constructor keywords and a ``"run"`` entry), for ``variant``.

    Args:
        method: a registered method name.
        family: where the family's settings come from: an adapter (anything with
            ``method_defaults(method, variant=...)``, which may map layer names to the loaded model), a
            ``recommended`` table (read with :func:`table_defaults`), or None (no settings).
        variant: the variant that runs; None: the entry's own ``variant``, else the method's constructor default.
    """
    if family is None:
        return {}
    getter = getattr(family, "method_defaults", None)

    def read(v: str | None) -> dict[str, Any]:
        if getter is not None:
            return dict(getter(method, variant=v))
        return table_defaults(family, method, variant=v)

    if variant is None:
        from attnseg.methods.base import METHODS, _import_builtin_methods

        _import_builtin_methods()
        base = read(None)
        variant = base.get("variant")
        if variant is None and method in METHODS.list():
            variant = _constructor_default(METHODS.get(method), "variant")
        if variant is None:
            return base
    return read(variant)


def resolve_settings(
    method: str,
    family: Any = None,
    *,
    preset: str = "family",
    params: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
) -> ResolvedSettings:
    """Merge a method's preset with the user's settings (see the module docstring).

    Args:
        method: a registered method name.
        family: the family's settings: an adapter (its ``method_defaults``), a ``recommended`` table (method ->
            settings), or None for none (see :func:`family_settings`).
        preset: ``"family"`` or ``"paper"``.
        params: the user's constructor keywords (win over the preset); a ``variant`` among them also chooses the
            family's per-variant settings.
        run: the user's run options (win over the preset); None values are ignored.
    """
    from attnseg.methods.base import METHODS, _import_builtin_methods

    base: dict[str, Any]
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {PRESETS}, got {preset!r}")
    _import_builtin_methods()
    cls = METHODS.get(method)
    user = dict(params or {})
    if preset == "paper":
        # A paper that defines its settings per model (GoCA's reference configs per family: layers, timestep) takes
        # them from the family's table; then the method's own paper values.
        base = {}
        if getattr(cls, "paper_settings_per_family", False):
            base = family_settings(method, family, variant=user.get("variant"))
        base.update(copy.deepcopy(dict(getattr(cls, "paper_preset", {}))))
    else:
        base = family_settings(method, family, variant=user.get("variant"))
    base_run = dict(base.pop("run", {}) or {})
    unknown = sorted(set(base_run) - set(RUN_KEYS))
    if unknown:
        raise ConfigError(f"{preset} preset of {method!r}: unknown run options {unknown}; known: {list(RUN_KEYS)}")
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
