"""Model adapters, one per family, and loading from the Hub or a local folder."""

from __future__ import annotations

from typing import Any

__all__ = [
    "family_defaults",
    "family_variant_defaults",
    "generation_defaults",
    "import_builtin_adapters",
    "list_model_families",
]

_BUILTIN = ("unet", "pixart", "sd3", "flux", "toy", "toy_flux")


def import_builtin_adapters() -> None:
    """Import attnseg's adapter modules once, so that each registers its family in ``ADAPTERS``."""
    import importlib

    for name in _BUILTIN:
        importlib.import_module(f"attnseg.models.{name}")


def list_model_families() -> dict[str, str]:
    """Supported families and bundled models with a one-line description."""
    return {
        "unet": "Stable Diffusion 1.x / 2.x / XL (Hub id or local diffusers folder)",
        "pixart": "PixArt-Sigma / PixArt-alpha (PixArtTransformer2DModel, T5 with attention mask, DDPM)",
        "sd3": "Stable Diffusion 3 / 3.5 (SD3Transformer2DModel, joint attention, image tokens first, flow matching)",
        "flux": "Flux.1 dev / schnell (FluxTransformer2DModel, joint attention, text tokens first, flow matching)",
        "toyworld": "attnseg's bundled toy text-to-image UNet (--model toyworld, offline)",
        "toyworld-flux": "attnseg's bundled toy Flux-architecture transformer (--model toyworld-flux, offline)",
    }


def _family_tables() -> dict[str, dict[str, Any]]:
    from attnseg.models.base import ADAPTERS

    import_builtin_adapters()
    tables = {family: getattr(ADAPTERS.get(family), "recommended", None) for family in ADAPTERS}
    return {family: table for family, table in tables.items() if isinstance(table, dict) and table}


def _shown(settings: Any) -> dict[str, Any]:
    return {**settings.params, **({"run": settings.run} if settings.run else {})}


def family_defaults() -> dict[str, dict[str, Any]]:
    """Per family, per method: the settings a method given by name runs with on the family's reference checkpoint
    (:func:`attnseg.presets.resolve_settings` with the ``"family"`` preset and no user settings: constructor
    keywords, and a ``"run"`` entry with run options when there are some), for ``attnseg list``.

    Layer names are those of the family's reference checkpoint; on a model of another depth the adapter maps
    them to the same relative depth (:meth:`~attnseg.models.base.DiffusionAdapter.method_defaults`).
    """
    from attnseg.methods.base import list_methods
    from attnseg.presets import resolve_settings

    methods = set(list_methods())
    return {
        family: {m: _shown(resolve_settings(m, table)) for m in table if m in methods}
        for family, table in _family_tables().items()
    }


def family_variant_defaults() -> dict[str, dict[str, dict[str, Any]]]:
    """Per family, per method, per variant the family declares settings for (``"variants"``): what the method runs
    with when that variant is asked for (as :func:`family_defaults`)."""
    from attnseg.methods.base import list_methods
    from attnseg.presets import resolve_settings

    methods = set(list_methods())
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for family, table in _family_tables().items():
        for m, entry in table.items():
            variants = entry.get("variants") if m in methods and isinstance(entry, dict) else None
            for v in variants or {}:
                settings = resolve_settings(m, table, params={"variant": v})
                out.setdefault(family, {}).setdefault(m, {})[v] = _shown(settings)
    return out


def generation_defaults() -> dict[str, dict[str, Any]]:
    """Per family the settings of ``attnseg generate`` (``recommended["generate"]``: steps, guidance)."""
    return {family: dict(table["generate"]) for family, table in _family_tables().items() if "generate" in table}
